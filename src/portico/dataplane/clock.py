"""The ``Date`` header line, rebuilt at most once a second.

RFC 9110 6.6.1: an origin with a clock must send ``Date``; a proxy adds it to a response that
lacks one (as nginx does) and to its own answers. Formatting a date per response would cost
more than the rest of the head, so the line is cached and rebuilt lazily, on the first use in
a new second: no timer, nothing at all when no response is written.
"""

from __future__ import annotations

import time
from email.utils import formatdate

_second = -1
_line = b""


def date_line() -> bytes:
    """``Date: <IMF-fixdate>\\r\\n`` for the current second."""
    global _second, _line
    now = int(time.time())
    if now != _second:
        _line = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
        _second = now
    return _line
