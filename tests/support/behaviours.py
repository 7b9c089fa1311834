"""Behaviours for ``RawBackend``: small asyncio handlers, well-behaved and not.

Each factory returns an ``async def handler(reader, writer)``. A handler owns one connection;
when it returns, ``RawBackend`` closes the connection (FIN). Handlers that loop serve
keep-alive connections until the peer closes. ``read_request`` is the minimal HTTP/1.1 request
reader they share: Content-Length and chunked bodies, tolerant of everything else, because the
point is to see what the proxy sent, not to judge it.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import random
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

#: Index (in ``RawBackend.received``) of the connection the current handler serves.
CONNECTION_INDEX: contextvars.ContextVar[int] = contextvars.ContextVar(
    "CONNECTION_INDEX", default=-1
)

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    chunked: bool = False

    def header(self, name: str) -> str | None:
        lower = name.lower()
        return next((v for k, v in self.headers if k.lower() == lower), None)

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """One request head without its final CRLFCRLF; None on EOF before any byte of it."""
    try:
        return (await reader.readuntil(b"\r\n\r\n"))[:-4]
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One whole request (head and body); None on a clean EOF between requests."""
    head = await read_head(reader)
    if head is None:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.rpartition(" ")
    headers = [(k, v.strip(" \t")) for k, _, v in (line.partition(":") for line in lines[1:])]
    request = Request(method, target, version, headers)
    codings = (request.header("transfer-encoding") or "").lower()
    if codings.rstrip().endswith("chunked"):
        request.chunked = True
        request.body, request.trailers = await _read_chunked(reader)
    elif (length := request.header("content-length")) is not None:
        request.body = await reader.readexactly(int(length))
    return request


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[str, str]]]:
    body = bytearray()
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16):
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # CRLF after the chunk data
    trailers = []
    while (line := (await reader.readuntil(b"\r\n"))[:-2]) != b"":
        name, _, value = line.decode("latin-1").partition(":")
        trailers.append((name, value.strip(" \t")))
    return bytes(body), trailers


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


# --- behaviours -----------------------------------------------------------------------------


def respond(raw: bytes = OK_RESPONSE, *, keep_alive: bool = True) -> Handler:
    """Answer every request with ``raw`` exactly; close after the first if not ``keep_alive``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await _send(writer, raw)
            if not keep_alive:
                return

    return handler


def slow_headers(delay: float, response: bytes = OK_RESPONSE) -> Handler:
    """Send the status line at once, the rest of ``response`` ``delay`` seconds later: a head
    that takes ``delay`` to complete (for response-header timeouts)."""
    status_line, sep, rest = response.partition(b"\r\n")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            await _send(writer, status_line + sep)
            await asyncio.sleep(delay)
            await _send(writer, rest)

    return handler


def never_respond() -> Handler:
    """Read whatever arrives and never answer; hold the connection until the peer closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass

    return handler


def close_immediately() -> Handler:
    """Close each connection as soon as it is accepted, reading nothing. If the peer's request
    had already arrived, the kernel turns the close into a reset (unread data)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return

    return handler


def close_after_request() -> Handler:
    """Read one whole request, then close without a byte of response."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    return handler


def close_after_headers(content_length: int = 100) -> Handler:
    """Read one request, send a response head promising ``content_length`` body bytes, then
    close cleanly (FIN) without sending any of them: a truncated response."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is not None:
            await _send(writer, head % content_length)

    return handler


def reset_mid_body(total: int = 1000, sent: int = 100, pause: float = 0.1) -> Handler:
    """Read one request, send a head with ``Content-Length: total`` and ``sent`` body bytes,
    then reset the connection (RST, via SO_LINGER 0). ``pause`` lets the peer read the partial
    body before the reset arrives, which is the case this behaviour exists to test."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is None:
            return
        await _send(writer, head % total + b"x" * sent)
        await asyncio.sleep(pause)
        reset(writer)

    return handler


def garbage(data: bytes = b"\x00\x01\x02 this is not HTTP \xff\xfe\r\n\r\n") -> Handler:
    """Read one request, answer with ``data`` (not HTTP), close."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is not None:
            await _send(writer, data)

    return handler


def echo_http() -> Handler:
    """A minimal correct HTTP/1.1 keep-alive server that describes each request it got.

    The body is JSON: method, target, version, headers (a list of [name, value] pairs, in order,
    duplicates kept), body_length, body_sha256, chunked, trailers, connection (index in
    ``RawBackend.received``) and request_number (1-based, on this connection). The same facts
    are repeated in ``X-Echo-*`` response headers. Honours ``Connection: close`` and HEAD.
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = 0
        while (request := await read_request(reader)) is not None:
            number += 1
            await _send(writer, _echo_response(request, number))
            if not request.keep_alive:
                return

    return handler


def _echo_response(request: Request, number: int) -> bytes:
    sha = hashlib.sha256(request.body).hexdigest()
    summary = {
        "method": request.method,
        "target": request.target,
        "version": request.version,
        "headers": [list(pair) for pair in request.headers],
        "body_length": len(request.body),
        "body_sha256": sha,
        "chunked": request.chunked,
        "trailers": [list(pair) for pair in request.trailers],
        "connection": CONNECTION_INDEX.get(),
        "request_number": number,
    }
    body = json.dumps(summary).encode()
    fields = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("X-Echo-Method", request.method),
        ("X-Echo-Target", request.target),
        ("X-Echo-Body-Length", str(len(request.body))),
        ("X-Echo-Body-Sha256", sha),
        ("X-Echo-Connection", str(CONNECTION_INDEX.get())),
        ("X-Echo-Request-Number", str(number)),
    ]
    if not request.keep_alive:
        fields.append(("Connection", "close"))
    head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    return head.encode("latin-1") + (b"" if request.method == "HEAD" else body)


def reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --- bulk transfers and held responses --------------------------------------------------------

#: Size of one block of the streaming pattern (and of each write ``stream_pattern`` makes).
PATTERN_BLOCK = 1024 * 1024
# The bytes every pattern block shares after its 8-byte index: fixed, not compressible, so any
# corruption, reordering, loss or duplication of a block changes the digest of the stream.
_PATTERN_TAIL = random.Random(20240611).randbytes(PATTERN_BLOCK - 8)


def pattern_block(index: int) -> bytes:
    """Block ``index`` of the pattern: its index (8 bytes, big-endian), then a fixed tail."""
    return index.to_bytes(8, "big") + _PATTERN_TAIL


@dataclass
class StreamProgress:
    """What ``stream_pattern`` has done so far, read by the test thread while it runs.

    Every field is replaced by one assignment on the backend's loop, so a reader in another
    thread sees a consistent value of each (not a snapshot of all of them together).
    """

    sent: int = 0  # body bytes handed to the transport
    waiting_drain: bool = False  # blocked in drain(): the transport's buffer is over its limit
    drain_waits: int = 0  # how many times a drain() had to wait
    done: bool = False  # the whole body was written and drained
    sha256: str = ""  # digest of the body sent, set when done


def stream_pattern(total: int, progress: StreamProgress, *, chunked: bool = False) -> Handler:
    """Answer one request with ``total`` body bytes of the pattern, generated block by block
    as the peer takes them (never held whole), framed by Content-Length or chunked (one chunk
    per block). Waits in ``drain()`` after every block, so a peer that stops reading stops the
    generator; ``progress`` shows where it stands and whether it is blocked."""
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % total

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is None:
            return
        await _send(writer, b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n")
        await _send(writer, framing + b"\r\n\r\n")
        transport = writer.transport
        high_water = transport.get_write_buffer_limits()[1]
        digest = hashlib.sha256()
        index = sent = 0
        while sent < total:
            block = pattern_block(index)[: total - sent]
            index += 1
            digest.update(block)
            if chunked:
                writer.writelines([b"%x\r\n" % len(block), block, b"\r\n"])
            else:
                writer.write(block)
            sent += len(block)
            progress.sent = sent
            if transport.get_write_buffer_size() > high_water:
                progress.drain_waits += 1
                progress.waiting_drain = True
            await writer.drain()
            progress.waiting_drain = False
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        progress.sha256 = digest.hexdigest()
        progress.done = True

    return handler


def respond_when(gate: threading.Event, raw: bytes = OK_RESPONSE, limit: float = 30.0) -> Handler:
    """Read each request, then hold the response until ``gate`` is set (by the test), at most
    ``limit`` seconds (then close without answering). A request in flight for as long as the
    test wants, without guessing durations."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while await read_request(reader) is not None:
            deadline = loop.time() + limit
            # Polled rather than awaited in an executor thread, which would outlive stop().
            while not gate.is_set():
                if loop.time() >= deadline:
                    return
                await asyncio.sleep(0.01)
            await _send(writer, raw)

    return handler


# --- a backend the test steers while it runs --------------------------------------------------


@dataclass
class Switchboard:
    """The live controls and records of one ``switchable`` backend, shared with the test.

    The test may change ``status`` (the answer to ordinary requests) and ``health`` (the answer
    to ``health_path``: a status, or a function of the check's 1-based number, e.g. to flap) at
    any moment; each request reads them as it arrives. A request whose target starts with
    ``/slow`` is held until ``release`` is set (at most ``hold_limit`` seconds, then the
    connection is closed unanswered). ``checks`` holds the arrival time (``time.monotonic``) of
    every health check, ``requests`` every other request, in arrival order. Both are appended
    to by the backend's thread only; read them through ``served``/``check_count``, which copy.
    """

    name: str
    status: int = 200
    health: int | Callable[[int], int] = 200
    health_path: str = "/health"
    release: threading.Event = field(default_factory=threading.Event)
    hold_limit: float = 30.0
    checks: list[float] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def served(self, prefix: str = "/") -> int:
        """Ordinary requests received whose target starts with ``prefix``."""
        return sum(1 for r in list(self.requests) if r.target.startswith(prefix))

    def check_count(self) -> int:
        return len(self.checks)


def switchable(board: Switchboard) -> Handler:
    """A keep-alive HTTP/1.1 backend steered by ``board`` (see ``Switchboard``). Every answer
    carries ``X-Backend: <name>``; ordinary ones have the name as their body."""
    from http import HTTPStatus

    def response(status: int, body: bytes, close: bool) -> bytes:
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "X"
        head = (
            f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nX-Backend: {board.name}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        return head.encode("latin-1") + body

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while (request := await read_request(reader)) is not None:
            close = not request.keep_alive
            if request.target == board.health_path:
                board.checks.append(loop.time())  # the default loop's clock is time.monotonic
                health = board.health
                status = health(len(board.checks)) if callable(health) else health
                await _send(writer, response(status, b"ok" if status < 400 else b"fail", close))
            else:
                board.requests.append(request)
                if request.target.startswith("/slow"):
                    deadline = loop.time() + board.hold_limit
                    # Polled rather than awaited in an executor thread, which would outlive stop().
                    while not board.release.is_set():
                        if loop.time() >= deadline:
                            return
                        await asyncio.sleep(0.01)
                await _send(writer, response(board.status, board.name.encode(), close))
            if close:
                return

    return handler
