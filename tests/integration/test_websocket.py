"""WebSocket (and Upgrade in general) through Portico.

A real server (the ``websockets`` package) runs on its own event loop in a thread owned by the
``ws_server`` fixture; clients are the ``websockets`` sync client, pointed at the proxy. When
the backend answers 101 the proxy becomes a raw tunnel with an idle timeout; when it answers
anything else the connection stays plain HTTP; a 101 nobody asked for is a bad response.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import Handler, read_request
from tests.support.rawhttp import RawConnection, build_request
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

# Seconds a client waits for anything; far above every proxy timeout configured here.
CLIENT_TIMEOUT = 5.0
# Slack allowed on top of a timeout before the test calls it late.
LATE = 1.5
MAX_MESSAGE = 4 << 20
LEAK = b"UPSTREAM-BYTES-LEAKED"


@dataclass
class Session:
    """What the server saw of one WebSocket connection."""

    path: str
    headers: dict[str, str]
    received: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    ended: bool = False


class WebSocketServer:
    """``websockets`` server on 127.0.0.1 in a background thread. Paths:

    ``/echo`` echoes every message; ``/close`` closes at once with 4001 "bye"; ``/hold``
    waits for the client to close. Every connection is recorded in ``sessions``.
    """

    def __init__(self) -> None:
        self.sessions: list[Session] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WebSocketServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            asyncio.run_coroutine_threadsafe(self._server.wait_closed(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        assert not self._thread.is_alive(), "websocket server loop did not stop"
        self._loop.close()

    async def _serve(self) -> Server:
        return await serve(
            self._handle,
            "127.0.0.1",
            0,
            ping_interval=None,  # no keep-alive pings: idle must mean idle
            max_size=MAX_MESSAGE,
            close_timeout=2,
        )

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        session = Session(request.path, {k.lower(): v for k, v in request.headers.raw_items()})
        self.sessions.append(session)
        try:
            if request.path == "/echo":
                async for message in ws:
                    session.received.append(message)
                    await ws.send(message)
            elif request.path == "/close":
                await ws.close(4001, "bye")
            else:
                await ws.wait_closed()
        finally:
            session.close_code = ws.close_code
            session.close_reason = ws.close_reason
            session.ended = True


@pytest.fixture
def ws_server() -> Iterator[WebSocketServer]:
    server = WebSocketServer().start()
    try:
        yield server
    finally:
        server.stop()


def config(backend: str, body_idle: float = 5.0) -> dict[str, Any]:
    return {
        "server": {"shutdown_grace": 0.5},
        "upstreams": {
            "app": {
                "backends": [backend],
                "timeouts": {"connect": 1.0, "response_header": 2.0, "body_idle": body_idle},
            }
        },
    }


def ws_connect(port: int, path: str) -> ClientConnection:
    return connect(
        f"ws://127.0.0.1:{port}{path}",
        proxy=None,  # never an HTTP proxy from the environment: loopback only
        open_timeout=CLIENT_TIMEOUT,
        close_timeout=2,
        ping_interval=None,
        max_size=MAX_MESSAGE,
    )


# --- a working tunnel -------------------------------------------------------------------------


def test_text_and_a_1mb_binary_message_echo_through_the_proxy(
    portico: PorticoFactory, ws_server: WebSocketServer
) -> None:
    proxy = portico(config(ws_server.url))
    payload = os.urandom(1_000_000)
    with ws_connect(proxy.port, "/echo") as ws:
        ws.send("hello, proxy")
        assert ws.recv(timeout=CLIENT_TIMEOUT) == "hello, proxy"
        ws.send(payload)
        echoed = ws.recv(timeout=CLIENT_TIMEOUT)
        assert isinstance(echoed, bytes) and echoed == payload
        ws.send("again")  # the tunnel is still framed correctly after a large message
        assert ws.recv(timeout=CLIENT_TIMEOUT) == "again"
    (session,) = ws_server.sessions
    assert session.received == ["hello, proxy", payload, "again"]
    # It went through Portico: the upgrade request carries the forwarding headers.
    assert session.headers["x-forwarded-for"] == "127.0.0.1"
    assert session.headers["upgrade"].lower() == "websocket"
    wait_until(lambda: session.ended, CLIENT_TIMEOUT, message="server saw the close")
    assert session.close_code == 1000


def test_server_initiated_close_reaches_the_client(
    portico: PorticoFactory, ws_server: WebSocketServer
) -> None:
    proxy = portico(config(ws_server.url))
    with ws_connect(proxy.port, "/close") as ws, pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=CLIENT_TIMEOUT)
    # A close frame came through (not just a dropped connection), and the client answered it.
    closed = info.value
    assert closed.rcvd is not None and closed.sent is not None, closed
    assert (closed.rcvd.code, closed.rcvd.reason) == (4001, "bye")
    assert closed.rcvd_then_sent
    # The closing handshake completed both ways: the server got the client's close frame.
    wait_until(lambda: ws_server.sessions and ws_server.sessions[0].ended, CLIENT_TIMEOUT)
    assert ws_server.sessions[0].close_code == 4001


def test_client_initiated_close_reaches_the_server(
    portico: PorticoFactory, ws_server: WebSocketServer
) -> None:
    proxy = portico(config(ws_server.url))
    with ws_connect(proxy.port, "/hold") as ws:
        ws.close(4002, "client bye")
    wait_until(lambda: ws_server.sessions and ws_server.sessions[0].ended, CLIENT_TIMEOUT)
    session = ws_server.sessions[0]
    assert (session.close_code, session.close_reason) == (4002, "client bye")


# --- tunnel idle timeout ----------------------------------------------------------------------


def test_idle_tunnel_is_closed_after_the_upstream_body_idle_timeout(
    portico: PorticoFactory, ws_server: WebSocketServer
) -> None:
    body_idle = 0.5
    proxy = portico(config(ws_server.url, body_idle=body_idle))
    with ws_connect(proxy.port, "/hold") as ws:
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=body_idle + LATE)  # TimeoutError (a failure) if never closed
        elapsed = time.monotonic() - started
    assert body_idle * 0.9 <= elapsed <= body_idle + LATE, elapsed
    wait_until(lambda: ws_server.sessions[0].ended, CLIENT_TIMEOUT, message="upstream closed")


def test_active_tunnel_outlives_the_idle_timeout(
    portico: PorticoFactory, ws_server: WebSocketServer
) -> None:
    body_idle = 0.5
    proxy = portico(config(ws_server.url, body_idle=body_idle))
    with ws_connect(proxy.port, "/echo") as ws:
        started = time.monotonic()
        for i in range(8):  # a message every 0.2 s: 1.6 s in all, over three body_idles
            ws.send(f"tick {i}")
            assert ws.recv(timeout=CLIENT_TIMEOUT) == f"tick {i}"
            time.sleep(0.2)  # the pacing under test, not a wait for a condition
        assert time.monotonic() - started > 3 * body_idle


# --- upgrades that do not happen --------------------------------------------------------------

UPGRADE_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def declining(status: bytes) -> Handler:
    """Keep-alive HTTP server that refuses every upgrade with ``status`` and answers other
    requests 200 with their target as the body."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            if request.header("upgrade") is not None:
                body = b"no upgrade here"
                writer.write(
                    b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
                )
            else:
                body = request.target.encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    return handler


@pytest.mark.parametrize("status", [b"426 Upgrade Required", b"400 Bad Request", b"200 OK"])
def test_declined_upgrade_leaves_plain_http_and_answers_a_pipelined_request(
    portico: PorticoFactory, raw_backend: RawBackendFactory, status: bytes
) -> None:
    backend = raw_backend(declining(status))
    proxy = portico(config(backend.url))
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        # Both requests in one write: the second sits behind the upgrade request until the
        # backend has decided.
        conn.send(
            build_request("GET", "/chat", headers=UPGRADE_HEADERS) + build_request("GET", "/after")
        )
        declined = conn.recv_response()
        after = conn.recv_response()
        assert (declined.status, declined.body) == (int(status[:3]), b"no upgrade here")
        assert (after.status, after.body) == (200, b"/after")
        # Still plain HTTP afterwards, too.
        assert conn.request("GET", "/third").body == b"/third"
    received = backend.all_received()
    assert received.count(b"GET /after HTTP/1.1\r\n") == 1
    assert received.index(b"GET /chat ") < received.index(b"GET /after ")


def test_101_to_a_request_that_did_not_ask_for_an_upgrade_is_502(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        + LEAK
    )

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is not None:
            writer.write(answer)
            await writer.drain()
            await reader.read()  # hold the connection until the proxy drops it

    backend = raw_backend(handler)
    proxy = portico(config(backend.url))
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        resp = conn.request("GET", "/plain")
        assert (resp.status, resp.reason) == (502, "Bad Gateway"), resp.raw
        assert b"101" not in resp.raw and LEAK not in resp.raw
        conn.closed(timeout=0.2)  # collect anything else the proxy sends
        assert conn.pending == b"", "bytes after the 101 reached the client"
    wait_until(lambda: backend.records[0].closed, CLIENT_TIMEOUT, message="upstream dropped")
