"""Per-request inputs to affinity: the hash key of keyed balancers and the sticky cookie."""

from __future__ import annotations

from portico.codec.events import RequestHead


def cookie_value(head: RequestHead, name: bytes) -> str | None:
    """The value of cookie ``name`` in the request's Cookie header(s), if any."""
    prefix = name + b"="
    for hname, value in head.headers:
        if len(hname) == 6 and hname.lower() == b"cookie":
            for part in value.split(b";"):
                part = part.strip()
                if part.startswith(prefix):
                    return part[len(prefix) :].decode("latin-1")
    return None


def hash_key(spec: str, head: RequestHead, target: bytes, client_ip: str) -> str | None:
    """The key named by ``upstreams.*.hash_key`` for this request (None: not present)."""
    if spec == "client_ip":
        return client_ip
    if spec == "uri":
        return target.decode("latin-1")
    if spec == "path":
        return target.partition(b"?")[0].decode("latin-1")
    kind, _, name = spec.partition(":")
    if kind == "cookie":
        return cookie_value(head, name.encode("latin-1"))
    wanted = name.lower().encode("latin-1")
    for hname, value in head.headers:
        if hname.lower() == wanted:
            return value.decode("latin-1")
    return None


def sticky_cookie_value(name: bytes, value: str, max_age: int | None) -> bytes:
    """The Set-Cookie value of the sticky cookie (HttpOnly: scripts have no use for it)."""
    line = name + b"=" + value.encode("ascii") + b"; Path=/; HttpOnly"
    if max_age is not None:
        line += b"; Max-Age=%d" % max_age
    return line
