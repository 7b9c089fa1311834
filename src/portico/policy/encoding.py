"""Content-coding negotiation: which of the codings we offer a client's ``Accept-Encoding``
takes (RFC 9110 12.5.3), used by the compression stage and by precompressed static files.

Pure: header bytes in, a coding name (or None for identity) out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# The codings Portico can produce, by their ``Content-Encoding`` token.
CODINGS = ("zstd", "br", "gzip")
# Old spellings clients still send (RFC 9110 8.4.1.3: x-gzip is gzip).
_ALIASES = {"x-gzip": "gzip"}


def _qvalue(text: str) -> float | None:
    # qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ); anything else is invalid.
    t = text.strip()
    if not t or len(t) > 5 or t[0] not in "01":
        return None
    if len(t) > 1 and (t[1] != "." or (not t[2:].isdigit() and t[2:] != "")):
        return None
    try:
        q = float(t)
    except ValueError:
        return None
    return q if 0.0 <= q <= 1.0 else None


def parse_accept_encoding(values: Iterable[bytes]) -> dict[str, float]:
    """Codings and their q-values from every ``Accept-Encoding`` field value. An element with
    an invalid q-value is dropped (rather than the whole field), the strictest reading that
    still serves the client."""
    out: dict[str, float] = {}
    for value in values:
        for element in value.decode("latin-1").split(","):
            token, _, params = element.partition(";")
            name = token.strip().lower()
            if not name:
                continue
            q: float | None = 1.0
            for param in params.split(";") if params else ():
                key, _, val = param.partition("=")
                if key.strip().lower() == "q":
                    q = _qvalue(val)
            if q is None:
                continue
            name = _ALIASES.get(name, name)
            # The same coding twice: keep the higher preference (clients do not mean less).
            out[name] = max(q, out.get(name, 0.0))
    return out


def choose(accepted: dict[str, float] | None, offered: Sequence[str]) -> str | None:
    """The coding to send, from ``offered`` (the server's preference order), or None for
    identity. No ``Accept-Encoding`` at all means identity: RFC 9110 allows any coding
    then, but old clients that send nothing cannot be assumed to decode one.

    The highest q wins; ties go to the server's order. ``*`` covers codings not named.
    Identity wins only if the client named it (or ``*``) with a q above every offer."""
    if not accepted:
        return None
    star = accepted.get("*")
    best: str | None = None
    best_q = 0.0
    for coding in offered:
        q = accepted.get(coding, star if star is not None else 0.0)
        if q > best_q:
            best, best_q = coding, q
    if best is None:
        return None
    identity = accepted.get("identity", star)
    if identity is not None and identity > best_q:
        return None
    return best


def ranked(accepted: dict[str, float] | None, offered: Sequence[str]) -> list[str]:
    """Every offered coding the client accepts, best first (q, then the server's order), as
    ``choose`` would pick them one after another: for precompressed files, where the best
    coding may have no file on disk and the next one is tried."""
    out: list[str] = []
    rest = list(offered)
    while rest:
        best = choose(accepted, rest)
        if best is None:
            break
        out.append(best)
        rest.remove(best)
    return out


def negotiate(values: Iterable[bytes], offered: Sequence[str]) -> str | None:
    return choose(parse_accept_encoding(values), offered)
