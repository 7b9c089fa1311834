"""Serialising HTTP/1.1 heads and body framing. Pure byte builders, no I/O."""

from __future__ import annotations

from http import HTTPStatus

LAST_CHUNK = b"0\r\n\r\n"

# Reason phrases for the heads Portico writes itself (errors, 100 Continue), built once.
REASONS: dict[int, bytes] = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of the chunked transfer coding."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def status_line(status: int, reason: bytes | None = None) -> bytes:
    if reason is None:
        reason = REASONS.get(status, b"Unknown")
    return b"HTTP/1.1 %d %b\r\n" % (status, reason)
