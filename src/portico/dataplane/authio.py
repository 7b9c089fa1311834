"""The I/O behind the authentication stages: a small HTTP client for JWKS fetches and
forward-auth subrequests, and a thread pool for slow password hashes.

The client opens one connection per request (``Connection: close``): auth services and
JWKS endpoints are asked rarely enough (JWKS: once per cache period; forward auth: once per
request, like nginx's auth_request) that a pool would buy little against the code it needs.
Every exchange is bounded in time (the caller's timeout covers connect, TLS, head and body)
and in size (``max_body``), and every failure is the same ``None``: the stage fails closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from portico.codec.events import Data, EndOfMessage, ResponseHead
from portico.codec.parser import ResponseParser
from portico.errors import PorticoError
from portico.runtime.authseam import FetchDone, FetchResult
from portico.runtime.request import Headers

log = logging.getLogger("portico.auth")

# Slow checks waiting for a thread at most; beyond it the stage answers 503 at once rather
# than queue logins without bound (each is ~50-300 ms of CPU).
MAX_PENDING = 64
# Threads for password hashes, per worker. The libraries release the GIL, so a check runs
# beside the event loop; one thread leaves the loop a core of its own on a small machine
# (with two, two cost-14 checks slowed an unrelated request to 0.4 s on a loaded 2-core
# box). Repeated logins are cached and concurrent identical ones share a check, so one
# thread sees only first logins.
HASH_THREADS = 1


class _TooLarge(Exception):
    pass


class HttpFetcher:
    __slots__ = ("_ssl", "_tasks")

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._ssl: dict[str | None, ssl.SSLContext] = {}

    def request(
        self, url: str, method: bytes, headers: Headers, timeout: float, max_body: int,
        done: FetchDone, ca_file: str | None = None,
    ) -> None:
        task = asyncio.get_running_loop().create_task(
            self._run(url, method, headers, timeout, max_body, done, ca_file)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, url: str, method: bytes, headers: Headers, timeout: float, max_body: int,
        done: FetchDone, ca_file: str | None,
    ) -> None:
        result: FetchResult | None = None
        try:
            async with asyncio.timeout(timeout):
                result = await self._exchange(url, method, headers, max_body, ca_file)
        except (OSError, TimeoutError, PorticoError, _TooLarge, ssl.SSLError) as e:
            log.warning("auth: %s %s failed: %s", method.decode(), url, e or type(e).__name__)
        done(result)

    def _context(self, ca_file: str | None) -> ssl.SSLContext:
        context = self._ssl.get(ca_file)
        if context is None:
            # Made once per CA file (loading the system's CAs costs milliseconds).
            context = self._ssl[ca_file] = ssl.create_default_context(cafile=ca_file)
        return context

    async def _exchange(
        self, url: str, method: bytes, headers: Headers, max_body: int, ca_file: str | None
    ) -> FetchResult:
        u = urlsplit(url)
        https = u.scheme == "https"
        host = u.hostname or ""
        port = u.port or (443 if https else 80)
        context = self._context(ca_file) if https else None
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=host if https else None
        )
        try:
            path = (u.path or "/").encode()
            lines = [method + b" " + path + b" HTTP/1.1", b"Host: " + u.netloc.encode()]
            lines += [n + b": " + v for n, v in headers]
            lines.append(b"Connection: close")
            if method not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE"):
                lines.append(b"Content-Length: 0")
            writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
            parser = ResponseParser()
            parser.expect(method)
            status = 0
            got: Headers = []
            body = bytearray()
            while True:
                data = await reader.read(65536)
                events = parser.feed(data) if data else parser.feed_eof()
                for ev in events:
                    if isinstance(ev, ResponseHead) and not ev.informational:
                        status, got = ev.status, list(ev.headers)
                    elif isinstance(ev, Data):
                        body += ev.data
                        if len(body) > max_body:
                            raise _TooLarge(f"answer larger than {max_body} bytes")
                    elif isinstance(ev, EndOfMessage):
                        return FetchResult(status, got, bytes(body))
                if not data:
                    raise ConnectionError("closed before a whole response")
        finally:
            writer.close()


class ThreadOffload:
    """Runs slow checks on a small thread pool, at most ``MAX_PENDING`` queued or running."""

    __slots__ = ("_pool", "pending")

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.pending = 0

    def run(self, fn: Callable[[], bool], done: Callable[[bool], None]) -> bool:
        if self.pending >= MAX_PENDING:
            return False
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                HASH_THREADS, thread_name_prefix="portico-auth"
            )
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self._pool, fn)

        def finished(f: asyncio.Future[bool]) -> None:
            self.pending -= 1
            ok = not f.cancelled() and f.exception() is None and f.result() is True
            done(ok)

        future.add_done_callback(finished)
        return True
