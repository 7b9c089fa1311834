"""Shared building blocks of the config schema: strict models and value types."""

from __future__ import annotations

import ipaddress
import re
import shlex
from decimal import Decimal
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
)

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

PositiveSeconds = Annotated[float, Field(gt=0)]


def _split_argv(value: object) -> object:
    """A command may be written as one string; split it as a shell would (no expansion)."""
    return shlex.split(value) if isinstance(value, str) else value


Argv = Annotated[list[str], BeforeValidator(_split_argv)]
NonNegSeconds = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too). Raises ValueError with a readable reason."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r} is not host:port")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r} has no port (expected host:port)")
        return host or "127.0.0.1", default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    return host or "0.0.0.0", int(port_text)


# Byte units a size string may use, matched case-insensitively. Deliberately narrower than
# pydantic's ByteSize, which also takes bit units ("8kbit" is 1000 bytes) and one-letter units,
# and ignores trailing text ("10MiB oops" parses as 10MiB): for a limit, a misread unit is a
# silent misconfiguration, so anything else is refused with a reason.
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def _parse_size(value: object) -> object:
    """Bytes from an integer or a string such as ``"10MiB"`` / ``"1.5 GB"`` (rounded down)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must be at least 0, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError('expected a whole number of bytes or a string such as "10MiB"')
    m = _SIZE.match(value)
    if m is None:
        raise ValueError(f'{value!r} is not a size (expected a string such as "10MiB")')
    number, unit = m.groups()
    factor = _SIZE_UNITS.get(unit.lower() or "b")
    if factor is None:
        raise ValueError(
            f"{value!r}: unknown unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(Decimal(number) * factor)


def _check_listen_address(value: str) -> str:
    parse_hostport(value)
    return value


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network") from None
    return value


# Items are checked one by one (not in a list validator) so an error names its index:
# ``server.listen[1]: ...`` rather than the whole list.
ListenAddress = Annotated[str, AfterValidator(_check_listen_address)]
Network = Annotated[str, AfterValidator(_check_network)]
Size = Annotated[ByteSize, BeforeValidator(_parse_size)]
