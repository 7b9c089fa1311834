"""The ``waf`` key of a route: ModSecurity with the OWASP Core Rule Set (docs/security.md).

Only the shape and the ranges are checked here; whether the rule files can be read and
compile is checked by ``portico check`` (control/wafcheck.py), because that needs the files
and the engine, and by every compile, which refuses a rule set that does not load.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import ByteSize, Field, field_validator, model_validator

from portico.config.types import Size, Strict

# Where Debian's modsecurity-crs package puts the rules and the setup file.
DEFAULT_CRS = "/usr/share/modsecurity-crs/rules"
DEFAULT_CRS_SETUP = "/etc/modsecurity/crs/crs-setup.conf"

_ARG = re.compile(r"^[A-Za-z0-9_.\-\[\]]+$")


class WafExclusion(Strict):
    """Rules switched off for requests under one path (optionally for some arguments only)."""

    path: str = Field(description="path prefix these exclusions apply to")
    rules: list[int] = Field(description="rule ids switched off under the path")
    args: list[str] = Field(
        default_factory=list,
        description="only for these request arguments (query or form fields); empty = all",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or any(c in v for c in " \"'\r\n\0?#\\"):
            raise ValueError("must be a path starting with '/' (no spaces, quotes, '?' or '#')")
        return v

    @field_validator("rules")
    @classmethod
    def _ids(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("name at least one rule id")
        return _rule_ids(v)

    @field_validator("args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        for a in v:
            if not _ARG.match(a):
                raise ValueError(f"{a!r} is not an argument name (letters, digits, _.-[])")
        return v


def _rule_ids(v: list[int]) -> list[int]:
    for rid in v:
        if not 1 <= rid <= 9_999_999:
            raise ValueError(f"{rid} is not a rule id (1-9999999)")
    return v


class Waf(Strict):
    """``waf = { enabled = true }`` or ``waf = true``: the CRS at paranoia level 1, blocking."""

    enabled: bool = True
    mode: Literal["block", "detect"] = Field(
        "block", description="detect: log what would be blocked and let it through"
    )
    paranoia_level: int = Field(1, ge=1, le=4, description="CRS paranoia level, 1-4")
    inbound_threshold: int = Field(
        5, ge=1, description="request anomaly score that blocks (CRS default 5)"
    )
    outbound_threshold: int = Field(
        4, ge=1, description="response anomaly score that is logged (with inspect_response)"
    )
    body_limit: Size = Field(
        ByteSize(131072),  # 128 KiB: ModSecurity's own default for form data
        description="request body bytes read and inspected before the request goes on",
    )
    inspect_response: bool = Field(
        False, description="also run the response rules (logged; the response is not held)"
    )
    exclude_rules: list[int] = Field(
        default_factory=list, description="rule ids switched off on this route"
    )
    exclusions: list[WafExclusion] = Field(
        default_factory=list, description="rule ids switched off under a path"
    )
    crs: str | None = Field(
        DEFAULT_CRS, description="directory of the CRS rules/*.conf; empty = no CRS"
    )
    crs_setup: str | None = Field(
        DEFAULT_CRS_SETUP, description="the CRS setup file loaded before the rules"
    )
    rules: list[str] = Field(
        default_factory=list, description="more rule files, loaded after the CRS"
    )
    directives: str = Field("", description="more SecLang directives, loaded last")

    @field_validator("exclude_rules")
    @classmethod
    def _ids(cls, v: list[int]) -> list[int]:
        return _rule_ids(v)

    @field_validator("crs", "crs_setup", mode="before")
    @classmethod
    def _empty(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _something(self) -> Waf:
        if self.enabled and self.crs is None and not self.rules and not self.directives.strip():
            raise ValueError("no rules: set crs, rules or directives (or enabled = false)")
        if int(self.body_limit) < 1:
            raise ValueError("body_limit: must be at least 1 byte")
        return self


def waf_flag(v: object) -> object:
    """``waf = true`` is the defaults; ``waf = false`` is no WAF."""
    return {} if v is True else None if v is False else v
