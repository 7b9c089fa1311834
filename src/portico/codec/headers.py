"""Header facts shared by the parser, the writer and the proxy. Names are lower-case bytes."""

from __future__ import annotations

# RFC 9110 7.6.1 connection-specific fields, plus the legacy proxy ones (RFC 2616 13.5.1) that
# must never cross a proxy: Proxy-Authorization is credentials meant for *this* hop.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Set by the proxy itself; what a client sends under these names is replaced unless the
# client is a trusted proxy (then X-Forwarded-For and Forwarded are appended to).
FORWARDING: frozenset[bytes] = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip", b"forwarded"}
)

# Fields whose framing role the proxy takes over (it re-frames bodies itself).
FRAMING: frozenset[bytes] = frozenset({b"content-length", b"transfer-encoding"})

IDEMPOTENT_METHODS: frozenset[bytes] = frozenset(
    {b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"}
)


def connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """The lower-cased tokens of every ``Connection`` field value, except the framing fields.

    The proxy removes the fields these tokens name. ``Connection: content-length`` must not
    remove Content-Length: the body would be forwarded without framing and read by the next
    hop as a second, smuggled message. Framing is Portico's own business (it re-frames).
    """
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token and token not in FRAMING:
                tokens.add(token)
    return frozenset(tokens)


def split_host(host: bytes) -> bytes:
    """``example.com:8080`` -> ``example.com`` (and ``[::1]:80`` -> ``[::1]``)."""
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end != -1 else host
    return host.partition(b":")[0]
