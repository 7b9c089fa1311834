"""The ``[admin]`` table: the admin listener (API, dashboard, metrics), off unless given.

Reads (the dashboard, ``GET /api/...``, ``/metrics``) are open on the admin listener unless
``read = "token"``; actions (drain, weight, scale, restart, reload) always need a token, or
come through the Unix socket, whose file permissions are the guard. A listen address that is
not loopback without any token is refused: it would hand the fleet to anyone who can connect.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from portico.config.types import ListenAddress, Strict, parse_hostport

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

#: The name ``token = "..."`` is logged under (``tokens`` gives names of one's own).
DEFAULT_TOKEN_NAME = "admin"


def is_loopback(listen: str) -> bool:
    host, _ = parse_hostport(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


class Admin(Strict):
    """The admin listener: dashboard at /, metrics at /metrics, JSON API under /api/."""

    listen: ListenAddress | None = Field(
        "127.0.0.1:9901", description="TCP address of the admin listener; empty = none"
    )
    token: str | None = Field(
        None, description="bearer token for actions (logged as 'admin')", min_length=8
    )
    tokens: dict[str, str] = Field(
        default_factory=dict, description="more bearer tokens by name; actions log the name"
    )
    unix_socket: str | None = Field(
        None, description="Unix socket for the same API; actions through it need no token"
    )
    metrics: bool = Field(
        True, description="count requests and serve /metrics (off: no counting at all)"
    )
    read: Literal["open", "token"] = Field(
        "open", description="'token': reads need a token too (the dashboard asks for one)"
    )

    @field_validator("listen", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("tokens")
    @classmethod
    def _named(cls, v: dict[str, str]) -> dict[str, str]:
        for name, token in v.items():
            if not _NAME.match(name):
                raise ValueError(f"{name!r}: a token name is letters, digits, '_', '.', '-'")
            if len(token) < 8:
                raise ValueError(f"{name}: a token needs at least 8 characters")
        return v

    @model_validator(mode="after")
    def _guarded(self) -> Admin:
        if self.listen is None and self.unix_socket is None:
            raise ValueError("listen: give a listen address or a unix_socket (or drop [admin])")
        if self.listen is not None and not is_loopback(self.listen) and not self.all_tokens():
            raise ValueError(
                f"token: the admin listener on {self.listen} is not loopback-only; set a"
                " token (or tokens), or listen on 127.0.0.1 / a unix_socket"
            )
        return self

    def all_tokens(self) -> dict[str, str]:
        """Token -> the name actions are logged under."""
        found = {token: name for name, token in self.tokens.items()}
        if self.token is not None:
            found[self.token] = DEFAULT_TOKEN_NAME
        return found
