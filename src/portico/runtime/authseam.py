"""What the authentication stages share: the two I/O seams the data plane implements
(``Fetcher``: an HTTP client; ``Offload``: a thread for slow checks) and the plain replies."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from portico.runtime.request import Headers
from portico.runtime.stages import LocalReply


class FetchResult:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


FetchDone = Callable[[FetchResult | None], None]


class Fetcher(Protocol):
    """An HTTP client on the event loop (dataplane/authio.py); None to ``done`` on any
    failure: refused, reset, timed out, garbage, a body over ``max_body``, a certificate
    not signed by the system's CAs (or by ``ca_file`` when given)."""

    def request(
        self, url: str, method: bytes, headers: Headers, timeout: float, max_body: int,
        done: FetchDone, ca_file: str | None = None,
    ) -> None: ...


class Offload(Protocol):
    """Runs a slow pure function off the event loop; False when too many already wait."""

    def run(self, fn: Callable[[], bool], done: Callable[[bool], None]) -> bool: ...


def plain(status: int, headers: Headers, body: bytes) -> LocalReply:
    return LocalReply(status, [*headers, (b"Content-Type", b"text/plain; charset=utf-8")], body)


UNAVAILABLE = plain(503, [(b"Retry-After", b"1")], b"Authentication unavailable\n")


def strip_headers(headers: Headers, names: frozenset[bytes]) -> Headers:
    return [(n, v) for n, v in headers if n.lower() not in names]


def first_header(headers: Headers, lname: bytes) -> bytes | None:
    for n, v in headers:
        if len(n) == len(lname) and n.lower() == lname:
            return v
    return None
