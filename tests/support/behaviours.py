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
import socket
import struct
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
