"""The one place that turns an error into an HTTP response.

Error responses are built once per (status, close) pair and cached, so answering a flood of
bad requests costs no formatting; only the cached ``Date`` line is joined in.
"""

from __future__ import annotations

from functools import lru_cache

from portico.codec.writer import REASONS, status_line
from portico.dataplane.clock import date_line
from portico.errors import NoHealthyEndpoint, PorticoError

# Seconds a client is told to wait when nothing can serve it; short because endpoints
# come back (or are started) within seconds.
RETRY_AFTER_SECONDS = 1


def error_response(
    status: int, close: bool = True, retry_after: int | None = None, reason: str | None = None
) -> bytes:
    """The whole response for ``status``, with the current ``Date``; ``reason`` goes in a
    ``Portico-Reason`` header (why no instance serves, e.g. an app crash-looping)."""
    head, body = _error_parts(status, close, retry_after, reason)
    return head + date_line() + b"\r\n" + body


@lru_cache(maxsize=64)
def _error_parts(
    status: int, close: bool, retry_after: int | None, why: str | None
) -> tuple[bytes, bytes]:
    """(head without its Date and final CRLF, body): the part that never changes."""
    reason = REASONS.get(status, b"Error")
    body = b"%d %b\n" % (status, reason)
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"Retry-After", str(retry_after).encode()))
    if why:
        # Printable ASCII only, and short: it is a hint, not a log.
        safe = "".join(c for c in why if " " <= c <= "~")[:120]
        headers.append((b"Portico-Reason", safe.encode("ascii")))
    if close:
        headers.append((b"Connection", b"close"))
    out = [status_line(status, reason)]
    out.extend(name + b": " + value + b"\r\n" for name, value in headers)
    return b"".join(out), body


def response_for(
    error: PorticoError, close: bool = True, request_id: tuple[bytes, bytes] | None = None
) -> bytes:
    """The response for any Portico error: its own status, ``Retry-After`` on 503 (with the
    reason no instance serves, when known), and the request ID (header name, value) when the
    request has one: an error is when a client most needs the ID to find the request in the
    logs."""
    if isinstance(error, NoHealthyEndpoint):
        data = error_response(error.status, close, RETRY_AFTER_SECONDS, error.detail)
    else:
        data = error_response(error.status, close)
    if request_id is None:
        return data
    head, _, body = data.partition(b"\r\n\r\n")
    name, value = request_id
    return head + b"\r\n" + name + b": " + value + b"\r\n\r\n" + body
