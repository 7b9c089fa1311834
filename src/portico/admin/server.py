"""The admin listener's HTTP/1.1 server: small, separate from the data plane, plain asyncio.

It serves a handful of operators and scripts, not traffic, so it favours being simple and
strict over being fast: one request at a time per connection, bodies only with
Content-Length (up to ``MAX_BODY``), heads up to ``MAX_HEAD``; anything else is answered with
its 4xx and the connection closed. A response is either bytes or a stream (Server-Sent
Events), which ends when the client goes away or the server closes.

Listens on TCP (``admin.listen``) and/or a Unix socket (``admin.unix_socket``); a request that
came through the Unix socket is marked so, and the API treats it as trusted (file permissions
guard the socket, as Docker's and HAProxy's stats sockets do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from portico.config.types import parse_hostport
from portico.errors import StartupError

log = logging.getLogger("portico.admin")

# A request head larger than this is refused (431): the admin API needs nothing near it.
MAX_HEAD = 16 * 1024
# Largest request body: a whole config file posted for reload fits many times over.
MAX_BODY = 4 * 1024 * 1024
# An idle keep-alive connection is closed after this many seconds.
IDLE_TIMEOUT = 60.0


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes = b""
    via_unix: bool = False


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None
    on_close: Callable[[], None] | None = None  # called once the stream ends, however it ends


Handler = Callable[[Request], Awaitable[Response]]


class AdminServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.servers: list[asyncio.Server] = []
        self.address: tuple[str, int] | None = None
        self._unix_path: str | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` while the listener runs; cancelled by ``stop``."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(self, listen: str | None, unix_socket: str | None) -> None:
        if listen is not None:
            host, port = parse_hostport(listen)
            try:
                server = await asyncio.start_server(
                    lambda r, w: self._accept(r, w, via_unix=False), host.strip("[]"), port
                )
            except OSError as exc:
                raise StartupError(f"admin.listen {listen}: {exc.strerror or exc}") from None
            self.servers.append(server)
            self.address = server.sockets[0].getsockname()[:2]
            log.info("admin listener on http://%s", listen)
        if unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix_socket)  # a stale socket of an earlier run
            try:
                server = await asyncio.start_unix_server(
                    lambda r, w: self._accept(r, w, via_unix=True), unix_socket
                )
            except OSError as exc:
                raise StartupError(f"admin.unix_socket {unix_socket}: {exc}") from None
            os.chmod(unix_socket, 0o600)  # the socket's permissions are its guard
            self._unix_path = unix_socket
            self.servers.append(server)
            log.info("admin listener on unix:%s", unix_socket)

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for task in [*self._connections, *self._background]:
            task.cancel()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, via_unix: bool
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer, via_unix)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, via_unix: bool
    ) -> None:
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
            except asyncio.LimitOverrunError:
                await _write(writer, _plain(431, "request head too large"), close=True)
                return
            if len(head) > MAX_HEAD:
                await _write(writer, _plain(431, "request head too large"), close=True)
                return
            request, problem = _parse_head(head, via_unix)
            if request is None:
                await _write(writer, problem or _plain(400, "bad request"), close=True)
                return
            length = request.headers.get("content-length", "0")
            if "transfer-encoding" in request.headers:
                await _write(writer, _plain(411, "send the body with Content-Length"), True)
                return
            if not length.isdigit() or int(length) > MAX_BODY:
                await _write(writer, _plain(413, f"body over {MAX_BODY} bytes"), close=True)
                return
            if int(length):
                request.body = await asyncio.wait_for(reader.readexactly(int(length)), IDLE_TIMEOUT)
            try:
                response = await self.handler(request)
            except Exception:
                log.exception("admin: %s %s failed", request.method, request.path)
                response = _plain(500, "internal error (see the Portico log)")
            close = request.headers.get("connection", "").lower() == "close"
            if response.stream is not None:
                if request.method == "HEAD":
                    _close_stream(response)
                    response = Response(response.status, b"", response.content_type)
                else:
                    await _write_stream(writer, response)
                    return
            await _write(writer, response, close, head_only=request.method == "HEAD")
            if close:
                return


def _parse_head(head: bytes, via_unix: bool) -> tuple[Request | None, Response | None]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None, None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None, None
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None, None
        headers[name.lower()] = value.strip()
    url = urlsplit(target)
    if not url.path.startswith("/"):
        return None, None
    query = dict(parse_qsl(url.query, keep_blank_values=True))
    return Request(method, unquote(url.path), query, headers, via_unix=via_unix), None


def _plain(status: int, message: str) -> Response:
    return Response(status, message.encode() + b"\n", "text/plain; charset=utf-8")


def _head_bytes(response: Response, extra: list[tuple[str, str]]) -> bytes:
    reason = HTTPStatus(response.status).phrase
    lines = [f"HTTP/1.1 {response.status} {reason}", f"Content-Type: {response.content_type}"]
    lines += [f"{k}: {v}" for k, v in [*response.headers, *extra]]
    lines.append("Cache-Control: no-store")
    lines.append("X-Content-Type-Options: nosniff")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write(
    writer: asyncio.StreamWriter, response: Response, close: bool, head_only: bool = False
) -> None:
    extra = [("Content-Length", str(len(response.body)))]
    if close:
        extra.append(("Connection", "close"))
    writer.write(_head_bytes(response, extra) + (b"" if head_only else response.body))
    await writer.drain()


async def _write_stream(writer: asyncio.StreamWriter, response: Response) -> None:
    assert response.stream is not None
    try:
        writer.write(_head_bytes(response, [("Connection", "close")]))
        async for chunk in response.stream:
            writer.write(chunk)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            await response.stream.aclose()  # type: ignore[attr-defined]
        _close_stream(response)


def _close_stream(response: Response) -> None:
    if response.on_close is not None:
        response.on_close()
        response.on_close = None
