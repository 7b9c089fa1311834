"""Timeouts: slow or silent clients and stalled backends are cut off in time, and only them.

Each test sets the timeout under test to a fraction of a second through the config and every
other timeout well above it, so the one that fires is the one named. Each also checks the
other side of the rule where one exists: another client served meanwhile, a slow-but-steady
transfer not cut off, backpressure time not counted against the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import Handler, RawBackend, echo_http, read_request, slow_headers
from tests.support.behaviours import read_head
from tests.support.rawhttp import (
    IncompleteResponse,
    RawConnection,
    RawResponse,
    build_request,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

# Seconds a client waits for anything; far above every proxy timeout configured here.
CLIENT_TIMEOUT = 5.0
# Slack allowed on top of a timeout before the test calls it late.
LATE = 1.5
# What every timeout not under test is set to: long enough never to fire in a test.
NOT_UNDER_TEST = 5.0


def config(
    backend: str,
    server: dict[str, float] | None = None,
    upstream: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "server": {
            "shutdown_grace": 0.5,
            "timeouts": {
                "header": NOT_UNDER_TEST,
                "body_idle": NOT_UNDER_TEST,
                "body_min_rate": 0,
                "body_grace": 0,
                "keepalive": NOT_UNDER_TEST,
                "send": NOT_UNDER_TEST,
                **(server or {}),
            },
        },
        "upstreams": {
            "app": {
                "backends": [backend],
                "timeouts": {
                    "connect": 1.0,
                    "response_header": NOT_UNDER_TEST,
                    "body_idle": NOT_UNDER_TEST,
                    **(upstream or {}),
                },
            }
        },
    }


def assert_408(resp: RawResponse) -> None:
    assert (resp.status, resp.reason) == (408, "Request Timeout"), resp.raw
    assert resp.header("connection") == "close"
    assert resp.header_values("content-length") == [str(len(resp.body))]


def send_until_closed(
    conn: RawConnection, data: bytes, step: int, interval: float
) -> tuple[int, float]:
    """Send ``data`` ``step`` bytes every ``interval`` seconds until all is sent or the proxy
    closes the connection. Returns (bytes sent, seconds until the close or the end).

    The pacing is the wait for the close itself, so a close is seen within one interval."""
    started = time.monotonic()
    sent = 0
    while sent < len(data):  # bounded: len(data) / step iterations
        try:
            conn.send(data[sent : sent + step])
        except OSError:  # the proxy closed first and our byte met a reset
            break
        sent += step
        if conn.closed(timeout=interval):
            break
    return sent, time.monotonic() - started


@pytest.fixture
def echo_backend(raw_backend: RawBackendFactory) -> RawBackend:
    return raw_backend(echo_http())


class Requester:
    """Another client, in a thread, making requests one after another on a keep-alive
    connection until stopped; records (status, seconds) per request."""

    def __init__(self, port: int, limit: int = 500) -> None:
        self.port = port
        self.limit = limit
        self.results: list[tuple[int, float]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="requester", daemon=True)

    def _run(self) -> None:
        try:
            with RawConnection(self.port, timeout=CLIENT_TIMEOUT) as conn:
                for i in range(self.limit):
                    if self._stop.is_set():
                        return
                    started = time.monotonic()
                    resp = conn.request("GET", f"/other/{i}")
                    self.results.append((resp.status, time.monotonic() - started))
                    self._stop.wait(0.02)
        except BaseException as e:  # reported by the test through .errors
            self.errors.append(e)

    def __enter__(self) -> Requester:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(CLIENT_TIMEOUT + 1)
        assert not self._thread.is_alive(), "the other client hung"


# --- client request head ----------------------------------------------------------------------


def test_slowloris_gets_408_and_is_closed_while_another_client_is_served(
    portico: PorticoFactory, echo_backend: RawBackend
) -> None:
    header_timeout = 0.5
    proxy = portico(config(echo_backend.url, server={"header": header_timeout}))
    # 80 bytes at 1 byte per 100 ms would take 8 s: far beyond the 0.5 s allowed.
    head = build_request("GET", "/slow", headers={"X-Pad": "p" * 40})
    assert len(head) >= 80
    with Requester(proxy.port) as other, RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as slow:
        sent, elapsed = send_until_closed(slow, head, step=1, interval=0.1)
    assert sent < len(head), "the proxy waited for the whole trickled head"
    assert header_timeout * 0.9 <= elapsed <= header_timeout + LATE, elapsed
    assert_408(slow.recv_response())
    assert slow.pending == b""
    assert not other.errors, other.errors
    assert len(other.results) >= 5, other.results
    assert {status for status, _ in other.results} == {200}
    # Served normally: never held up for anything like the slowloris's header timeout.
    assert max(seconds for _, seconds in other.results) < header_timeout, other.results
    assert b"/slow" not in echo_backend.all_received()


def test_client_that_sends_nothing_is_closed_after_the_header_timeout(
    portico: PorticoFactory, echo_backend: RawBackend
) -> None:
    header_timeout = 0.5
    proxy = portico(config(echo_backend.url, server={"header": header_timeout}))
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        started = time.monotonic()
        assert not conn.closed(timeout=header_timeout * 0.6)
        assert conn.closed(timeout=header_timeout + LATE)
        elapsed = time.monotonic() - started
        assert header_timeout * 0.9 <= elapsed <= header_timeout + LATE, elapsed
        if conn.pending:  # a 408 is allowed (nginx just closes)
            assert_408(conn.recv_response())
    assert echo_backend.connections == 0


# --- keep-alive idle --------------------------------------------------------------------------


def test_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    portico: PorticoFactory, echo_backend: RawBackend
) -> None:
    keepalive = 0.5
    proxy = portico(config(echo_backend.url, server={"keepalive": keepalive}))
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        assert conn.request("GET", "/one").status == 200
        # A request inside the idle window is served on the same connection...
        assert not conn.closed(timeout=keepalive * 0.5)
        assert conn.request("GET", "/two").json()["request_number"] == 2
        # ...and the idle window restarts after each response.
        started = time.monotonic()
        assert not conn.closed(timeout=keepalive * 0.6)
        assert conn.closed(timeout=keepalive + LATE)
        elapsed = time.monotonic() - started
    assert keepalive * 0.9 <= elapsed <= keepalive + LATE, elapsed
    assert conn.pending == b"", "an idle close sends nothing"


def test_keepalive_timeout_does_not_cut_a_slow_response(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    # The connection is not idle while a request is in flight, however long the backend takes.
    keepalive = 0.3
    backend = raw_backend(slow_headers(1.0))
    proxy = portico(config(backend.url, server={"keepalive": keepalive}))
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        resp = conn.request("GET", "/")
    assert (resp.status, resp.body) == (200, b"ok")


# --- client request body ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [(1, 408), (10, 200)],
    ids=["10-bytes-per-s-cut-off", "100-bytes-per-s-served"],
)
def test_upload_below_the_minimum_rate_gets_408(
    portico: PorticoFactory, echo_backend: RawBackend, step: int, expected: int
) -> None:
    # body_min_rate 50 B/s after a 0.3 s grace; body_idle far away, so only the rate can fire.
    settings = {"body_min_rate": 50, "body_grace": 0.3, "body_idle": NOT_UNDER_TEST}
    proxy = portico(config(echo_backend.url, server=settings))
    body = b"b" * 100
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        conn.send(build_request("POST", "/upload", body=body)[: -len(body)])
        sent, elapsed = send_until_closed(conn, body, step=step, interval=0.1)
        resp = conn.recv_response()
    if expected == 408:
        assert_408(resp)
        assert sent < len(body)
        assert elapsed <= 0.3 + LATE, elapsed
        # The half-sent request died with the client connection, upstream too.
        wait_until(lambda: echo_backend.records[0].peer_closed, 2.0, message="upstream closed")
    else:
        assert resp.status == 200 and resp.json()["body_length"] == len(body)


@pytest.mark.parametrize(
    ("pause", "expected"), [(None, 408), (0.15, 200)], ids=["stops", "steady-pauses"]
)
def test_upload_that_stops_gets_408_after_body_idle(
    portico: PorticoFactory, echo_backend: RawBackend, pause: float | None, expected: int
) -> None:
    body_idle = 0.4
    proxy = portico(config(echo_backend.url, server={"body_idle": body_idle}))
    body = b"b" * 100
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        conn.send(build_request("POST", "/upload", body=body)[:-90])  # 10 of 100 bytes
        started = time.monotonic()
        if pause is None:
            resp = conn.recv_response()  # and send nothing more
        else:
            # 10 bytes every 0.15 s: never idle for body_idle, though the upload takes
            # longer than body_idle in all.
            send_until_closed(conn, body[10:], step=10, interval=pause)
            resp = conn.recv_response()
        elapsed = time.monotonic() - started
    if expected == 408:
        assert_408(resp)
        assert body_idle * 0.9 <= elapsed <= body_idle + LATE, elapsed
    else:
        assert elapsed > body_idle
        assert resp.status == 200 and resp.json()["body_length"] == len(body)


def slow_reader(stall: float, pace_bytes: int, pace_seconds: float) -> Handler:
    """Read a request head, read nothing for ``stall`` seconds, then read the body
    ``pace_bytes`` per ``pace_seconds``; answer 200 with the body's length and SHA-256."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        if head is None:
            return
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await asyncio.sleep(stall)
        digest = hashlib.sha256()
        remaining = length
        while remaining:  # bounded by the declared length
            data = await reader.readexactly(min(pace_bytes, remaining))
            digest.update(data)
            remaining -= len(data)
            await asyncio.sleep(pace_seconds)
        body = b"%d %s" % (length, digest.hexdigest().encode())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    return handler


def test_upload_slowed_by_a_slow_backend_is_not_cut_off(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    # The backend reads nothing for 1 s (more than twice body_idle), then ~26 MB/s. The
    # client can send only as fast as the backend reads, because the proxy pauses reading
    # from it (backpressure). Counted against the client, that pause would be a 408 twice
    # over: body_idle 0.3 s passes during the stall, and the average rate over wall-clock
    # time (what fits in the socket buffers, a few MB, in over 1 s) is below body_min_rate
    # 20 MB/s. Time the proxy itself paused the client must not count.
    stall = 1.0
    settings = {"body_idle": 0.3, "body_min_rate": 20_000_000, "body_grace": 0.2}
    backend = raw_backend(slow_reader(stall, pace_bytes=1 << 20, pace_seconds=0.04))
    proxy = portico(config(backend.url, server=settings))
    body = bytes(range(256)) * (96 * 1024)  # 24 MiB: far more than the socket buffers hold
    with RawConnection(proxy.port, timeout=10.0) as conn:
        started = time.monotonic()
        try:
            conn.send(build_request("POST", "/upload", body=body))
        except OSError as e:
            answer = conn.recv_until_close(1.0)[:200]
            pytest.fail(
                f"upload cut off after {time.monotonic() - started:.2f}s ({e!r}), "
                f"the proxy said {answer!r}: backpressure time was counted against the client"
            )
        send_seconds = time.monotonic() - started
        resp = conn.recv_response()
    # The sendall was held back by the stalled backend, so backpressure really happened.
    assert send_seconds >= stall * 0.8, f"upload not held back ({send_seconds:.2f}s)"
    assert resp.status == 200, resp.raw[:300]
    assert resp.body == b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())


# --- client not reading the response ----------------------------------------------------------


def big_response(total: int, lost: threading.Event) -> Handler:
    """``/big``: 200 with a ``total``-byte body written as fast as the proxy takes it; sets
    ``lost`` when the proxy drops the connection mid-body. Anything else: a small 200."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            if request.target != "/big":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            piece = b"x" * (1 << 20)
            try:
                for _ in range(total // len(piece)):  # bounded by total
                    writer.write(piece)
                    await writer.drain()
            except ConnectionError:
                lost.set()
                raise
            return

    return handler


def drain(sock: socket.socket, timeout: float) -> tuple[str, int]:
    """Read until the connection ends; returns how it ended ("reset", "eof" or "timeout")
    and the number of bytes read."""
    received = 0
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:  # bounded by the deadline
        sock.settimeout(remaining)
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            return "reset", received
        except TimeoutError:
            break
        if not data:
            return "eof", received
        received += len(data)
    return "timeout", received


@pytest.fixture
def stalled_reader() -> Iterator[socket.socket]:
    """A client socket with a small receive buffer, so that not reading fills up quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(CLIENT_TIMEOUT)
    yield sock
    sock.close()


def test_client_that_stops_reading_is_cut_off_after_the_send_timeout(
    portico: PorticoFactory, raw_backend: RawBackendFactory, stalled_reader: socket.socket
) -> None:
    send_timeout = 0.5
    total = 256 << 20  # never fits in socket buffers
    lost = threading.Event()
    backend = raw_backend(big_response(total, lost))
    proxy = portico(config(backend.url, server={"send": send_timeout}))
    stalled_reader.connect(("127.0.0.1", proxy.port))
    with Requester(proxy.port) as other:
        started = time.monotonic()
        stalled_reader.sendall(build_request("GET", "/big"))
        # Poll the backend's side: the proxy gives up on the stalled client and drops the
        # upstream connection it was reading from for it.
        wait_until(lambda: lost.is_set(), send_timeout + LATE + 1.0, interval=0.01)
        elapsed = time.monotonic() - started
    assert send_timeout * 0.9 <= elapsed <= send_timeout + LATE, elapsed
    assert not other.errors, other.errors
    assert len(other.results) >= 5 and {s for s, _ in other.results} == {200}, other.results
    # The stalled client finds its connection ended: reset, or closed far short of the body.
    ending, received = drain(stalled_reader, CLIENT_TIMEOUT)
    assert ending in ("reset", "eof") and received < total, (ending, received)
    # The proxy still serves new clients.
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        assert conn.request("GET", "/after").status == 200


# --- upstream body idle -----------------------------------------------------------------------


def trickling_body(pieces: int, gap: float, stall: bool = False) -> Handler:
    """200 with Content-Length ``pieces * 10``: ten bytes every ``gap`` seconds. With
    ``stall``, it sends the first piece, then nothing until the peer gives up."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is None:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (pieces * 10))
        for i in range(pieces):
            writer.write(b"%010d" % i)
            await writer.drain()
            if stall:
                await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)  # until the proxy drops
                return
            await asyncio.sleep(gap)

    return handler


@pytest.mark.parametrize(
    ("stall", "expected"), [(True, "aborted"), (False, "complete")], ids=["stalls", "steady"]
)
def test_upstream_that_stalls_mid_body_aborts_the_client_in_time(
    portico: PorticoFactory, raw_backend: RawBackendFactory, stall: bool, expected: str
) -> None:
    body_idle = 0.4
    # Steady: 10 bytes every 0.15 s for 8 pieces (1.2 s in all, longer than body_idle).
    backend = raw_backend(trickling_body(8, 0.15, stall))
    proxy = portico(config(backend.url, upstream={"body_idle": body_idle}))
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        conn.send(build_request("GET", "/"))
        started = time.monotonic()
        if expected == "aborted":
            with pytest.raises(IncompleteResponse) as info:
                conn.recv_response()
            elapsed = time.monotonic() - started
            assert info.value.partial.startswith(b"HTTP/1.1 200 OK\r\n")
            assert info.value.partial.endswith(b"0000000000")
            assert body_idle * 0.9 <= elapsed <= body_idle + LATE, elapsed
        else:
            resp = conn.recv_response()
            assert resp.body == b"".join(b"%010d" % i for i in range(8))
            assert time.monotonic() - started > body_idle
