"""Path normalization for routing (RFC 3986 6.2.2), so a route cannot be dodged by spelling.

Routes match the normalized path: ``/%61dmin`` and ``/x/../admin`` both reach the route for
``/admin`` (and whatever stages guard it). Only percent-encoded *unreserved* characters are
decoded; ``%2F`` stays encoded because decoding it would change the path's structure. A path
whose dot segments climb above the root is refused (400), as nginx does.
"""

from __future__ import annotations

import re

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")


def _decode_unreserved(m: re.Match[bytes]) -> bytes:
    byte = int(m.group(1), 16)
    if byte in _UNRESERVED:
        return bytes((byte,))
    return b"%" + m.group(1).upper()


def normalize_path(path: bytes) -> bytes | None:
    """The normalized form of an origin-form path (no query); None if it climbs above '/'."""
    # Int needles and find(): ``b"%" in path`` would first try b"%" as an integer (and
    # build a TypeError) on every call.
    pct = 37 in path  # "%"
    if not pct and path.find(b"/.") < 0 and path.find(b"//") < 0:
        return path  # the common case costs three scans of a short string
    if pct:
        path = _PCT.sub(_decode_unreserved, path)
    if path.find(b"/.") < 0 and path.find(b"//") < 0:
        return path
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == b".":
            if i == last:
                out.append(b"")
            continue
        if seg == b"..":
            if not out:
                return None
            out.pop()
            if i == last:
                out.append(b"")
            continue
        if seg == b"" and i != last:
            continue  # merge slashes, as nginx's merge_slashes does
        out.append(seg)
    return b"/" + b"/".join(out)
