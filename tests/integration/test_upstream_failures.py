"""Upstream failures: what a client sees when a backend is down, slow, lying or broken.

The rules under test (docs/architecture.md, "Errors" and the failure rules in
``dataplane/proxy.py``):

* nothing of the response has reached the client yet: a well-formed error response from the
  one error function: 502 (refused, reset, malformed), 504 (connect or response-head
  timeout), 503 with ``Retry-After`` (no endpoint);
* the response has started: the client connection is aborted, so a truncated body is never
  presented as complete;
* bytes an upstream sends after a complete response are never read as the next response;
* a warm pooled connection that died under a bodiless GET is retried once on a fresh one.

Every backend here is a real socket on 127.0.0.1: raw asyncio servers that misbehave on
purpose (``tests/support/behaviours.py`` and the small handlers below). Proxy timeouts are
fractions of a second; every client read has a deadline (``CLIENT_TIMEOUT``) well above them,
so a proxy that hangs fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import (
    CONNECTION_INDEX,
    Handler,
    close_after_headers,
    close_after_request,
    close_immediately,
    garbage,
    never_respond,
    read_request,
    reset_mid_body,
    respond,
    slow_headers,
)
from tests.support.behaviours import reset
from tests.support.ports import free_port
from tests.support.rawhttp import (
    IncompleteResponse,
    RawConnection,
    RawResponse,
    build_request,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

# Seconds a client waits for anything; far above every proxy timeout configured in this file.
CLIENT_TIMEOUT = 5.0
# Upstream response-head timeout for tests that are not about it: short, so that a proxy
# that wrongly waits for more fails fast, but long enough for a loaded machine.
RESPONSE_HEADER = 2.0
# Slack allowed on top of a timeout before the test calls it late.
LATE = 1.5
# A body marker the client must never see when the upstream's response is refused.
LEAK = b"UPSTREAM-BYTES-LEAKED"
LAST_CHUNK = b"0\r\n\r\n"


def config(
    *backends: str,
    timeouts: dict[str, float] | None = None,
    pool: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "server": {"shutdown_grace": 0.5},
        "upstreams": {
            "app": {
                "backends": list(backends),
                "timeouts": {
                    "connect": 1.0,
                    "response_header": RESPONSE_HEADER,
                    "body_idle": 2.0,
                    **(timeouts or {}),
                },
                **({"pool": pool} if pool else {}),
            }
        },
    }


def connect(proxy_port: int) -> RawConnection:
    return RawConnection(proxy_port, timeout=CLIENT_TIMEOUT)


def assert_error_response(resp: RawResponse, status: int, *, close: bool | None = None) -> None:
    """``resp`` is the proxy's own error response for ``status``, complete and well-formed."""
    reason = HTTPStatus(status).phrase
    assert (resp.version, resp.status, resp.reason) == ("HTTP/1.1", status, reason), resp.raw
    assert resp.header("content-type") == "text/plain; charset=utf-8"
    # The raw client read exactly Content-Length bytes; one length, matching the body.
    assert resp.header_values("content-length") == [str(len(resp.body))]
    assert not resp.chunked and resp.header("transfer-encoding") is None
    assert str(status).encode() in resp.body
    assert LEAK not in resp.raw
    retry_after = resp.header_values("retry-after")
    if status == 503:
        assert len(retry_after) == 1 and retry_after[0].isdigit() and int(retry_after[0]) > 0
    else:
        assert retry_after == []
    if close is not None:
        assert (resp.header("connection") == "close") is close, resp.headers


def wait_for_bytes(conn: RawConnection, marker: bytes, timeout: float = CLIENT_TIMEOUT) -> None:
    """Receive until ``marker`` is among the bytes received (kept unconsumed in ``pending``)."""

    def arrived() -> bool:
        if marker in conn.pending:
            return True
        closed = conn.closed(timeout=0.02)
        if marker in conn.pending:
            return True
        if closed:
            raise AssertionError(f"connection closed before {marker!r}; got {conn.pending!r}")
        return False

    wait_until(arrived, timeout, interval=0, message=f"{marker!r} from the proxy")


async def wait_gate(gate: threading.Event, timeout: float = CLIENT_TIMEOUT) -> None:
    """Inside a backend handler: wait until the test opens ``gate`` (bounded by ``timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not gate.is_set():
        if loop.time() > deadline:
            raise TimeoutError("the test never opened the gate")
        await asyncio.sleep(0.005)


def head(status: bytes = b"200 OK", *fields: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


# --- handlers used only here ----------------------------------------------------------------


def reset_after_request() -> Handler:
    """Read one whole request, then reset (RST) without a byte of response."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is not None:
            reset(writer)

    return handler


def send_then(data: bytes, end: str, gate: threading.Event | None = None) -> Handler:
    """Read one request, send ``data``; then (after ``gate`` opens, if given) ``end`` the
    connection: ``"fin"`` closes it, ``"rst"`` resets it, or any other value is bytes to send
    before closing."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is None:
            return
        writer.write(data)
        await writer.drain()
        if gate is not None:
            await wait_gate(gate)
        if end == "rst":
            reset(writer)
        elif end != "fin":
            writer.write(end.encode("latin-1"))
            await writer.drain()

    return handler


def answer_once_then(on_second: str) -> Handler:
    """Keep-alive without saying so: answer the first request on each connection normally;
    on the second, ``"close"`` without answering (the keep-alive race from the proxy's side)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is None:
            return
        body = b"conn=%d" % CONNECTION_INDEX.get()
        writer.write(head(b"200 OK", b"Content-Length: %d" % len(body)) + body)
        await writer.drain()
        if on_second == "close":
            await read_request(reader)

    return handler


def labelled(first: bytes) -> Handler:
    """Keep-alive server: connection 0 answers its first request with ``first`` (raw bytes);
    every other request gets 200 with body ``conn=N`` (N = connection index)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = CONNECTION_INDEX.get()
        number = 0
        while await read_request(reader) is not None:
            number += 1
            if index == 0 and number == 1:
                writer.write(first)
            else:
                body = b"conn=%d" % index
                writer.write(head(b"200 OK", b"Content-Length: %d" % len(body)) + body)
            await writer.drain()

    return handler


# --- connection-level failures before any response byte: 502 ---------------------------------


def test_connection_refused_is_502_and_the_connection_stays_usable(
    portico: PorticoFactory,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proxy = portico(config(dead))
    with connect(proxy.port) as conn:
        # A bodiless request was read completely, so keep-alive survives the error.
        assert_error_response(conn.request("GET", "/a"), 502, close=False)
        assert_error_response(conn.request("GET", "/b"), 502, close=False)
        assert conn.pending == b""


@pytest.mark.parametrize(
    "behaviour",
    [close_immediately, close_after_request, reset_after_request],
    ids=["closed-on-accept", "fin-after-request", "rst-after-request"],
)
def test_upstream_closing_or_resetting_before_a_response_is_502(
    portico: PorticoFactory,
    raw_backend: RawBackendFactory,
    behaviour: Callable[[], Handler],
) -> None:
    backend = raw_backend(behaviour())
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        assert_error_response(conn.request("GET", "/"), 502)
    assert backend.connections >= 1


# --- malformed responses: 502, and not a byte of them reaches the client ----------------------


BAD_RESPONSES = {
    "garbage": b"\x00\x01\x02 this is not HTTP \xff\xfe\r\n\r\n" + LEAK,
    "status-4-digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 21\r\n\r\n" + LEAK,
    "status-2-digits": b"HTTP/1.1 20 OK\r\nContent-Length: 21\r\n\r\n" + LEAK,
    "status-missing": b"HTTP/1.1 OK\r\nContent-Length: 21\r\n\r\n" + LEAK,
    "status-below-100": b"HTTP/1.1 099 Odd\r\nContent-Length: 21\r\n\r\n" + LEAK,
    "status-above-599": b"HTTP/1.1 600 Odd\r\nContent-Length: 21\r\n\r\n" + LEAK,
    "version-2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 21\r\n\r\n" + LEAK,
    "version-lowercase": b"http/1.1 200 OK\r\nContent-Length: 21\r\n\r\n" + LEAK,
    "not-http": b"ICY 200 OK\r\nContent-Length: 21\r\n\r\n" + LEAK,
    "bare-lf-status-line": b"HTTP/1.1 200 OK\nContent-Length: 21\r\n\r\n" + LEAK,
    "space-in-field-name": b"HTTP/1.1 200 OK\r\nContent Length: 21\r\n\r\n" + LEAK,
}

BAD_FRAMING = {
    "conflicting-content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\nContent-Length: 5\r\n\r\n" + LEAK
    ),
    "repeated-content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\nContent-Length: 21\r\n\r\n" + LEAK
    ),
    "content-length-list": b"HTTP/1.1 200 OK\r\nContent-Length: 21, 21\r\n\r\n" + LEAK,
    "content-length-signed": b"HTTP/1.1 200 OK\r\nContent-Length: +21\r\n\r\n" + LEAK,
    "content-length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"15\r\n" + LEAK + b"\r\n0\r\n\r\n"
    ),
    "chunked-and-content-length": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 21\r\n\r\n"
        b"15\r\n" + LEAK + b"\r\n0\r\n\r\n"
    ),
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + LEAK,
    "te-identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n" + LEAK,
    "te-chunked-not-last": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" + LEAK,
    "te-gzip-then-chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"15\r\n" + LEAK + b"\r\n0\r\n\r\n"
    ),
    "te-chunked-twice": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"15\r\n" + LEAK + b"\r\n0\r\n\r\n"
    ),
    "bad-first-chunk-size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + LEAK + b"\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize(
    "raw",
    list(BAD_RESPONSES.values()) + list(BAD_FRAMING.values()),
    ids=list(BAD_RESPONSES) + list(BAD_FRAMING),
)
def test_malformed_upstream_response_is_502(
    portico: PorticoFactory, raw_backend: RawBackendFactory, raw: bytes
) -> None:
    # respond() keeps the connection open: the proxy must decide from the bytes alone, not
    # wait for a close, and must not reuse the connection afterwards.
    backend = raw_backend(respond(raw))
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        resp = conn.request("GET", "/first")
        assert_error_response(resp, 502)
        assert LEAK not in conn.pending
        if resp.header("connection") != "close":
            # The client connection survives; the broken upstream connection must not.
            assert_error_response(conn.request("GET", "/second"), 502)
            assert backend.connections == 2
            assert b"/second" not in backend.received[0]


def test_garbage_behaviour_is_502(portico: PorticoFactory, raw_backend: RawBackendFactory) -> None:
    backend = raw_backend(garbage())
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        assert_error_response(conn.request("GET", "/"), 502)


# --- timeouts before a response: 504 ----------------------------------------------------------


def test_upstream_that_never_answers_gets_504_within_the_response_header_timeout(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    timeout = 0.4
    backend = raw_backend(never_respond())
    proxy = portico(config(backend.url, timeouts={"response_header": timeout}))
    with connect(proxy.port) as conn:
        started = time.monotonic()
        resp = conn.request("GET", "/")
        elapsed = time.monotonic() - started
        assert_error_response(resp, 504, close=False)
        assert timeout * 0.9 <= elapsed <= timeout + LATE, elapsed
        # The connection is still good for the next request, which fails the same way.
        assert_error_response(conn.request("GET", "/again"), 504)
    # A single backend: the timed-out request is not replayed to it on the same connection.
    assert backend.received[0].count(b"GET / HTTP/1.1") == 1


@pytest.mark.parametrize(
    ("head_delay", "timeout", "expected"),
    [(0.8, 0.3, 504), (0.1, 1.5, 200)],
    ids=["beyond-timeout", "within-timeout"],
)
def test_slow_response_head(
    portico: PorticoFactory,
    raw_backend: RawBackendFactory,
    head_delay: float,
    timeout: float,
    expected: int,
) -> None:
    # The status line arrives at once, the rest of the head after head_delay: partial head
    # bytes must not extend the deadline.
    backend = raw_backend(slow_headers(head_delay))
    proxy = portico(config(backend.url, timeouts={"response_header": timeout}))
    with connect(proxy.port) as conn:
        started = time.monotonic()
        resp = conn.request("GET", "/")
        elapsed = time.monotonic() - started
    if expected == 504:
        assert_error_response(resp, 504)
        assert timeout * 0.9 <= elapsed <= timeout + LATE, elapsed
    else:
        assert (resp.status, resp.body) == (200, b"ok")
        assert elapsed >= head_delay * 0.9


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A loopback port whose SYNs are dropped: a listener with backlog 0 whose accept queue
    is full and never drained. Connecting there hangs, as to a host that does not answer."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(16):  # Linux queues backlog + 1; a few more in case of variations
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(s)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            _, writable, _ = select.select([], [s], [], 0.3)
            if not writable:
                break  # this SYN was dropped: the queue is full
        else:
            pytest.skip("could not fill the accept queue: SYNs to a full listener are not dropped")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
        except TimeoutError:
            pass
        else:
            pytest.skip("a full accept queue still completes handshakes on this kernel")
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_connect_timeout_is_504(portico: PorticoFactory, blackhole_port: int) -> None:
    timeout = 0.3
    proxy = portico(config(f"http://127.0.0.1:{blackhole_port}", timeouts={"connect": timeout}))
    with connect(proxy.port) as conn:
        started = time.monotonic()
        resp = conn.request("GET", "/")
        elapsed = time.monotonic() - started
        assert_error_response(resp, 504, close=False)
        assert timeout * 0.9 <= elapsed <= timeout + LATE, elapsed


# --- failures after the response started: the client connection is aborted -------------------


def assert_aborted(conn: RawConnection) -> IncompleteResponse:
    """The response on ``conn`` ends early (close or reset), never as a complete message."""
    with pytest.raises(IncompleteResponse) as info:
        conn.recv_response()
    return info.value


@pytest.mark.parametrize(
    "behaviour",
    [
        lambda: close_after_headers(100),
        lambda: send_then(head(b"200 OK", b"Content-Length: 100") + b"x" * 40, "fin"),
        lambda: reset_mid_body(total=100, sent=40, pause=0.05),
    ],
    ids=["fin-after-head", "fin-mid-body", "rst-mid-body"],
)
def test_content_length_body_cut_short_aborts_the_client(
    portico: PorticoFactory, raw_backend: RawBackendFactory, behaviour: Callable[[], Handler]
) -> None:
    backend = raw_backend(behaviour())
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        conn.send(build_request("GET", "/"))
        error = assert_aborted(conn)
    # The head had been forwarded (the response had started), which is why 502 is too late.
    assert error.partial.startswith(b"HTTP/1.1 200 OK\r\n"), error.partial
    assert b"Content-Length: 100\r\n" in error.partial


@pytest.mark.parametrize("end", ["fin", "rst"])
def test_chunked_body_cut_before_the_last_chunk_is_never_terminated(
    portico: PorticoFactory, raw_backend: RawBackendFactory, end: str
) -> None:
    gate = threading.Event()
    first = head(b"200 OK", b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n"
    backend = raw_backend(send_then(first, end, gate))
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        conn.send(build_request("GET", "/"))
        wait_for_bytes(conn, b"hello")  # the response has started towards the client
        gate.set()
        error = assert_aborted(conn)
    assert b"hello" in error.partial
    assert LAST_CHUNK not in error.partial.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    "bad",
    ["zz\r\nmore\r\n0\r\n\r\n", "5\r\nhelloXX", "-1\r\n", "fffffffffffffffffff\r\n"],
    ids=["not-hex", "no-crlf-after-data", "negative", "overflow"],
)
def test_bad_chunk_mid_body_aborts_the_client(
    portico: PorticoFactory, raw_backend: RawBackendFactory, bad: str
) -> None:
    gate = threading.Event()
    first = head(b"200 OK", b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n"
    backend = raw_backend(send_then(first, bad, gate))
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        conn.send(build_request("GET", "/"))
        wait_for_bytes(conn, b"hello")
        gate.set()
        error = assert_aborted(conn)
    body = error.partial.split(b"\r\n\r\n", 1)[1]
    assert LAST_CHUNK not in body and b"more" not in body


def test_close_delimited_body_ended_by_fin_is_complete(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    # The contrast to the next test: without Content-Length or chunked coding, a FIN is the
    # normal end of the body, so the client gets it re-chunked and terminated.
    gate = threading.Event()
    backend = raw_backend(send_then(head(b"200 OK") + b"hello", "fin", gate))
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        conn.send(build_request("GET", "/"))
        wait_for_bytes(conn, b"hello")
        gate.set()
        resp = conn.recv_response()
    assert (resp.status, resp.body, resp.chunked) == (200, b"hello", True)


def test_close_delimited_body_cut_by_a_reset_is_not_complete(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    # RFC 9112 section 8: a close-delimited response is complete when the connection closes
    # "unless an error was indicated by the underlying connection". A reset is such an error.
    gate = threading.Event()
    backend = raw_backend(send_then(head(b"200 OK") + b"hello", "rst", gate))
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        conn.send(build_request("GET", "/"))
        wait_for_bytes(conn, b"hello")
        gate.set()
        error = assert_aborted(conn)
    assert LAST_CHUNK not in error.partial.split(b"\r\n\r\n", 1)[1]


# --- bytes after a complete response ----------------------------------------------------------

SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\n" + LEAK


@pytest.mark.parametrize(
    "first",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n" + SMUGGLED,
        b"HTTP/1.1 204 No Content\r\nContent-Length: 21\r\n\r\n" + LEAK,
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 21\r\n\r\n" + LEAK,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + SMUGGLED,
    ],
    ids=["204+response", "204+body", "304+body", "200+response"],
)
def test_bytes_after_a_complete_response_are_never_the_next_response(
    portico: PorticoFactory, raw_backend: RawBackendFactory, first: bytes
) -> None:
    backend = raw_backend(labelled(first))
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        one = conn.request("GET", "/one")
        assert one.status == int(first[9:12])
        assert LEAK not in one.raw
        # Nothing else arrives on the client connection from that upstream answer.
        assert not conn.closed(timeout=0.2)
        assert conn.pending == b""
        two = conn.request("GET", "/two")
    assert (two.status, two.body) == (200, b"conn=1"), "the second request needs a fresh upstream"
    assert backend.connections == 2
    assert b"/two" not in backend.received[0]
    wait_until(lambda: backend.records[0].peer_closed, 2.0, message="the tainted connection closed")


# --- warm connections that died while idle ---------------------------------------------------


def test_warm_connection_closed_on_reuse_is_retried_on_a_fresh_one(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    # Deterministic keep-alive race: the pooled connection looks alive, takes the request, and
    # the backend closes it without a byte of answer.
    backend = raw_backend(answer_once_then("close"))
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        assert conn.request("GET", "/one").body == b"conn=0"
        resp = conn.request("GET", "/two")
    assert (resp.status, resp.body) == (200, b"conn=1")
    assert backend.connections == 2
    assert b"GET /two " in backend.received[0]  # it really went to the warm connection first
    assert b"GET /two " in backend.received[1]


def test_backend_closing_idle_connections_causes_no_client_errors(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    # A backend that closes each connection right after answering, without Connection: close:
    # the proxy keeps it in the pool, and the close races the next request. Either way (the
    # close seen first, or the request sent on the dead connection) the client sees nothing.
    backend = raw_backend(respond(keep_alive=False))
    proxy = portico(config(backend.url))
    statuses = []
    with connect(proxy.port) as conn:
        for i in range(30):
            resp = conn.request("GET", f"/{i}")
            statuses.append((resp.status, resp.body))
    assert statuses == [(200, b"ok")] * 30


def test_warm_connection_closed_on_reuse_is_not_replayed_for_a_post(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    # The backend may have acted on a request it read before closing: a POST must not run twice.
    backend = raw_backend(answer_once_then("close"))
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        assert conn.request("GET", "/one").body == b"conn=0"
        resp = conn.request("POST", "/charge", body=b"amount=10")
    assert_error_response(resp, 502)
    posts = backend.all_received().count(b"POST /charge ")
    assert posts == 1, f"the POST reached the backend {posts} times"


def test_warm_connection_closed_on_reuse_is_not_replayed_for_a_bodiless_post(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    backend = raw_backend(answer_once_then("close"))
    proxy = portico(config(backend.url))
    with connect(proxy.port) as conn:
        assert conn.request("GET", "/one").body == b"conn=0"
        resp = conn.request("POST", "/charge?amount=10", headers={"Content-Length": "0"})
    posts = backend.all_received().count(b"POST /charge")
    assert posts == 1, f"the POST reached the backend {posts} times (got {resp.status})"
    assert_error_response(resp, 502)


# --- no endpoint: 503 ------------------------------------------------------------------------


def test_no_configured_endpoint_is_503_with_retry_after(portico: PorticoFactory) -> None:
    proxy = portico(config())
    with connect(proxy.port) as conn:
        assert_error_response(conn.request("GET", "/"), 503, close=False)
        assert_error_response(conn.request("GET", "/again"), 503, close=False)


def test_no_available_endpoint_is_503_with_retry_after(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    # The only backend fails its active health check, so it is taken out of rotation.
    backend = raw_backend(
        respond(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    )
    cfg = config(backend.url)
    cfg["upstreams"]["app"]["health"] = {"interval": 0.1, "timeout": 0.5, "fall": 1, "rise": 1}
    proxy = portico(cfg)

    def unavailable() -> RawResponse | None:
        with connect(proxy.port) as conn:
            resp = conn.request("GET", "/")
        assert resp.status in (500, 503), resp.raw  # the backend's own answer, until it is down
        return resp if resp.status == 503 else None

    resp = wait_until(unavailable, CLIENT_TIMEOUT, interval=0.05, message="endpoint marked down")
    assert_error_response(resp, 503, close=False)


# --- one error function: the same shape for every error, and close when the body is unread ----


@pytest.fixture
def failing_upstream(
    request: pytest.FixtureRequest, raw_backend: RawBackendFactory
) -> tuple[list[str], int, dict[str, float]]:
    """(backends, status the proxy must answer with, upstream timeouts) per scenario."""
    kind = request.param
    if kind == "refused":
        return [f"http://127.0.0.1:{free_port()}"], 502, {}
    if kind == "no-response":
        return [raw_backend(never_respond()).url], 504, {"response_header": 0.4}
    return [], 503, {}


SCENARIOS = ["refused", "no-response", "no-endpoint"]


@pytest.mark.parametrize("failing_upstream", SCENARIOS, indirect=True)
def test_error_after_the_whole_body_was_sent_keeps_framing(
    portico: PorticoFactory, failing_upstream: tuple[list[str], int, dict[str, float]]
) -> None:
    # The whole body went out with the head. Whether the proxy had read it when it decided
    # (503 is decided before the body is even looked at) is its business, but what it says
    # must hold: either Connection: close and a close, or keep-alive with the body skipped
    # (never parsed as the next request) and the next request answered.
    backends, status, timeouts = failing_upstream
    proxy = portico(config(*backends, timeouts=timeouts))
    with connect(proxy.port) as conn:
        body = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n".ljust(100, b"x")
        resp = conn.request("POST", "/upload", body=body)
        assert_error_response(resp, status)
        if resp.header("connection") == "close":
            assert conn.closed(timeout=CLIENT_TIMEOUT)
            assert conn.pending == b""
        else:
            assert_error_response(conn.request("GET", "/next"), status)
            assert not conn.closed(timeout=0.1)
            assert conn.pending == b"", "the body was answered as if it were a request"


@pytest.mark.parametrize("failing_upstream", SCENARIOS, indirect=True)
def test_error_before_the_body_was_read_closes_the_connection(
    portico: PorticoFactory, failing_upstream: tuple[list[str], int, dict[str, float]]
) -> None:
    # Only 10 of 100 body bytes sent: the proxy cannot know where the next request starts, so
    # it must say Connection: close and close.
    backends, status, timeouts = failing_upstream
    proxy = portico(config(*backends, timeouts=timeouts))
    with connect(proxy.port) as conn:
        partial = build_request("POST", "/upload", body=b"x" * 100)[:-90]
        conn.send(partial)
        resp = conn.recv_response()
        assert_error_response(resp, status, close=True)
        assert conn.closed(timeout=CLIENT_TIMEOUT)
        assert conn.pending == b""
