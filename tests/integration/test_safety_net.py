"""A safety net for the request path: behaviour a review found untested, each checked over
real sockets against a real ``portico serve``, so it holds whatever shape the data plane takes.

Each test names the behaviour it protects. They were checked by breaking that behaviour on
purpose (see the commit that added them): a bodiless POST answered 503 replayed, successes not
reported to outlier detection, a sticky cookie obeyed for a backend that is down or ejected,
idle pooled connections read after the backend spoke out of turn, and so on.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import Handler, RawBackend, read_request
from tests.support.behaviours import (
    CONNECTION_INDEX,
    StreamProgress,
    pattern_block,
    stream_pattern,
)
from tests.support.fleet import (
    CLIENT_TIMEOUT,
    Steerable,
    app_config,
    fleet,
    health_transitions,
    log_lines,
    request,
    served_by,
    wait_for_log,
)
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection, RawResponse, build_request
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

NO_OUTLIER = {"consecutive_failures": 0}
STICKY = {"secret": "safety-net-secret-0123456789abcdef"}


def answer(status: int, body: bytes, *, backend: str | None = None) -> bytes:
    """A whole keep-alive response; ``backend`` names its server in ``X-Backend``."""
    head = f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    if backend is not None:
        head += f"X-Backend: {backend}\r\n"
    return (head + "\r\n").encode() + body


# --- retries: a POST is never replayed --------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "tries"),
    [
        ("POST", {}, 1),  # bodiless, no Content-Length at all
        ("POST", {"Content-Length": "0"}, 1),
        ("PATCH", {}, 1),
        ("GET", {}, 2),  # idempotent: the 503 is retried on the other backend
    ],
)
def test_a_request_answered_503_is_replayed_only_if_idempotent(
    raw_backend: RawBackendFactory,
    portico: PorticoFactory,
    method: str,
    headers: dict[str, str],
    tries: int,
) -> None:
    backends = fleet(raw_backend, "a", "b", status=503)
    proxy = portico(
        app_config(
            [b.url for b in backends],
            retry={"attempts": 3, "on_status": [503]},
            outlier=NO_OUTLIER,
        )
    )
    resp = request(proxy.port, method, "/orders", headers)
    assert resp.status == 503, resp.raw[:300]
    received = sum(b.board.served("/orders") for b in backends)
    assert received == tries, f"{method} reached the backends {received} times"


# --- outlier detection: a success ends a failure streak ---------------------------------------


def scripted(statuses: list[int]) -> Handler:
    """A keep-alive backend answering its n-th request (over all connections) with
    ``statuses[n % len(statuses)]``, body ``n``. The test may change ``statuses`` in place."""
    counter = iter(range(1_000_000))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await read_request(reader) is not None:
            n = next(counter)
            writer.write(answer(statuses[n % len(statuses)], str(n).encode()))
            await writer.drain()

    return handler


def test_a_success_resets_the_outlier_failure_streak(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    # Two failures, one success, over and over: never three failures in a row.
    script = [500, 500, 200]
    flaky = raw_backend(scripted(script))
    steady = Steerable(raw_backend, "steady")
    proxy = portico(
        app_config(
            [flaky.url, steady.url],
            outlier={"consecutive_failures": 3, "base_ejection": 30},
            retry={"attempts": 1},
        )
    )
    statuses = [request(proxy.port, "GET", "/").status for _ in range(24)]
    # Round robin: every other request went to the flaky backend, which never left.
    assert statuses.count(500) == 8 and statuses.count(200) == 16, statuses
    assert flaky.connections >= 1 and len(flaky.all_received().split(b"GET / ")) - 1 == 12
    assert log_lines(proxy, "ejected") == []
    # The same setup does eject on three failures in a row (the detector is on).
    script[:] = [500]
    for _ in range(6):
        request(proxy.port, "GET", "/")
    wait_for_log(proxy, f"127.0.0.1:{flaky.port} ejected")


# --- sticky cookie: never obeyed for an unavailable backend -------------------------------------


def sticky_value(resp: RawResponse) -> str | None:
    for value in resp.header_values("Set-Cookie"):
        name, _, rest = value.partition("=")
        if name == "portico_backend":
            return rest.split(";", 1)[0]
    return None


def pinned(port: int, backends: list[Steerable]) -> tuple[str, Steerable, Steerable]:
    """A cookie pinning the client to one backend (checked: it sticks); that backend and the
    other."""
    first = request(port, "GET", "/")
    value = sticky_value(first)
    assert first.status == 200 and value is not None, first.raw[:300]
    cookie = {"Cookie": f"portico_backend={value}"}
    assert {served_by(request(port, "GET", "/", cookie)) for _ in range(6)} == {served_by(first)}
    [pin] = [b for b in backends if b.name == served_by(first)]
    [other] = [b for b in backends if b is not pin]
    return value, pin, other


def test_a_sticky_cookie_is_not_obeyed_for_a_backend_that_is_down(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backends = fleet(raw_backend, "a", "b")
    checks = {"interval": 0.1, "timeout": 0.5, "jitter": 0.0, "rise": 1, "fall": 1}
    proxy = portico(app_config([b.url for b in backends], sticky=STICKY, health=checks))
    value, pin, other = pinned(proxy.port, backends)
    pin.board.health = 500
    wait_until(lambda: any(t.startswith("DOWN") for t in health_transitions(proxy, pin.label)))
    for _ in range(6):
        resp = request(proxy.port, "GET", "/", {"Cookie": f"portico_backend={value}"})
        assert resp.status == 200 and served_by(resp) == other.name, resp.raw[:300]
        assert sticky_value(resp) not in (None, value), "the client was not re-pinned"
    assert pin.board.served() == 7  # the pinning requests only


def test_a_sticky_cookie_is_not_obeyed_for_an_ejected_backend(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backends = fleet(raw_backend, "a", "b")
    proxy = portico(
        app_config(
            [b.url for b in backends],
            sticky=STICKY,
            outlier={"consecutive_failures": 2, "base_ejection": 30},
            retry={"attempts": 1},
        )
    )
    value, pin, other = pinned(proxy.port, backends)
    cookie = {"Cookie": f"portico_backend={value}"}
    pin.board.status = 503
    assert [request(proxy.port, "GET", "/", cookie).status for _ in range(2)] == [503, 503]
    wait_for_log(proxy, f"{pin.label} ejected")
    pin.board.status = 200  # would answer well now: only the ejection keeps it out
    served = pin.board.served()
    for _ in range(6):
        resp = request(proxy.port, "GET", "/", cookie)
        assert resp.status == 200 and served_by(resp) == other.name, resp.raw[:300]
    assert pin.board.served() == served


# --- the client leaves in the middle ------------------------------------------------------------


def access_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def wait_for_record(path: Path, target: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((r for r in access_records(path) if r["target"] == target), None)

    record: dict[str, Any] = wait_until(found, 5, message=f"access log line for {target}")
    return record


def logged_config(backend: RawBackend, log_path: Path, **upstream: Any) -> dict[str, Any]:
    config = app_config([backend.url], outlier=NO_OUTLIER, **upstream)
    config["access_log"] = {"format": "json", "path": str(log_path)}
    return config


def abort(conn: RawConnection) -> None:
    """Leave like a killed client: a reset, not a polite close."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def download_or_echo(progress: StreamProgress, size: int) -> Handler:
    """GET /download: ``size`` bytes of the pattern, as the peer takes them, then close;
    anything else: an echo of method, target and body length on a keep-alive connection."""
    big = stream_pattern(size, progress)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            if req.target == "/download":
                # stream_pattern reads its own request: hand it one from a fresh reader.
                fake = asyncio.StreamReader()
                fake.feed_data(build_request("GET", "/download"))
                await big(fake, writer)
                return
            body = f"{req.method} {req.target} {len(req.body)}".encode()
            writer.write(answer(200, body))
            await writer.drain()

    return handler


def assert_fresh_connection_serves_next(proxy: PorticoProcess, backend: RawBackend) -> None:
    """The next request is answered in full, on a new backend connection (nothing of the
    abandoned exchange reused), and the abandoned one is gone."""
    before = backend.connections
    resp = request(proxy.port, "POST", "/next", body=b"hello")
    assert resp.status == 200 and resp.body == b"POST /next 5", resp.raw[:300]
    assert backend.connections == before + 1
    assert backend.received[-1].startswith(b"POST /next HTTP/1.1\r\n")
    assert b"/next" not in b"".join(backend.received[:before])


def test_client_leaving_mid_upload_is_logged_499_and_aborts_the_backend_connection(
    raw_backend: RawBackendFactory, portico: PorticoFactory, tmp_path: Path
) -> None:
    backend = raw_backend(download_or_echo(StreamProgress(), 0))
    log_path = tmp_path / "access.log"
    proxy = portico(logged_config(backend, log_path))
    conn = RawConnection(proxy.port, timeout=CLIENT_TIMEOUT)
    try:
        conn.send(build_request("POST", "/upload", {"Content-Length": str(10 * 2**20)}))
        conn.send(b"x" * 256 * 1024)
        wait_until(lambda: len(backend.all_received()) > 200 * 1024, 5, message="upload flowing")
    finally:
        abort(conn)
    [record] = backend.records
    wait_until(lambda: record.peer_closed or record.closed, 5, message="backend conn aborted")
    assert len(record.data) < 10 * 2**20
    assert wait_for_record(log_path, "/upload")["status"] == 499
    assert_fresh_connection_serves_next(proxy, backend)


def test_client_leaving_mid_download_aborts_the_backend_connection(
    raw_backend: RawBackendFactory, portico: PorticoFactory, tmp_path: Path
) -> None:
    progress = StreamProgress()
    size = 64 * 2**20
    backend = raw_backend(download_or_echo(progress, size))
    log_path = tmp_path / "access.log"
    proxy = portico(logged_config(backend, log_path))
    conn = RawConnection(proxy.port, timeout=CLIENT_TIMEOUT)
    try:
        conn.send(build_request("GET", "/download"))
        got = b""
        while len(got) < 2**20:
            got += conn.sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 200 ")
        body = got.partition(b"\r\n\r\n")[2]
        assert body[:4096] == pattern_block(0)[: min(len(body), 4096)]
    finally:
        abort(conn)
    [record] = backend.records
    wait_until(lambda: record.closed, 5, message="the backend connection to be aborted")
    assert not progress.done and progress.sent < size
    logged = wait_for_record(log_path, "/download")
    assert logged["status"] == 499, logged
    assert logged["bytes"] < size
    assert_fresh_connection_serves_next(proxy, backend)


# --- a backend that answers before reading the body ---------------------------------------------


def answer_before_body(answered: threading.Event) -> Handler:
    """Connection 0: read the request head only and answer 403 at once, keep-alive (as HTTP
    allows), then read and discard the rest of the body before serving the next request, as a
    correct server must. Every connection then echoes method, target and body length.

    Were Portico to put this connection back in its pool while part of the body was still
    unsent, the next request would be read as the rest of that body and never answered.
    """

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if CONNECTION_INDEX.get() == 0:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(answer(403, b"denied"))
            await writer.drain()
            answered.set()
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        while (req := await read_request(reader)) is not None:
            writer.write(answer(200, f"{req.method} {req.target} {len(req.body)}".encode()))
            await writer.drain()

    return handler


@pytest.mark.parametrize("client_sends", ["whole body", "part of the body"])
def test_backend_answering_before_reading_the_body(
    raw_backend: RawBackendFactory, portico: PorticoFactory, client_sends: str
) -> None:
    answered = threading.Event()
    backend = raw_backend(answer_before_body(answered))
    config = app_config([backend.url], outlier=NO_OUTLIER, retry={"attempts": 1})
    config["upstreams"]["app"]["timeouts"]["response_header"] = 2.0
    proxy = portico(config)
    body = b"y" * (4 * 2**20)
    sent = body if client_sends == "whole body" else body[: 256 * 1024]
    conn = RawConnection(proxy.port, timeout=CLIENT_TIMEOUT)
    sender_errors: list[BaseException] = []

    def send_body() -> None:
        try:
            conn.sock.sendall(sent)
        except OSError as e:  # Portico may close instead of reading the rest: allowed
            sender_errors.append(e)

    sender = threading.Thread(target=send_body, daemon=True)
    try:
        conn.send(build_request("POST", "/upload", {"Content-Length": str(len(body))}))
        sender.start()
        resp = conn.recv_response()
        assert resp.status == 403 and resp.body == b"denied", resp.raw[:300]
        sender.join(CLIENT_TIMEOUT)
        assert not sender.is_alive(), "the client's upload stalled"
    finally:
        conn.close()  # with part of the body sent: the client gives up on the rest
    # The backend marks it after its drain() returns, which can be after the 403 reached the
    # client through Portico: wait for it rather than race it.
    assert answered.wait(5), "the backend never answered before reading the body"
    # Nothing of the upload is taken for the next request, whichever connection serves it;
    # a connection left owing body bytes would take the next request for them.
    resp = request(proxy.port, "POST", "/next", body=b"hello")
    assert resp.status == 200 and resp.body == b"POST /next 5", resp.raw[:300]


# --- stray bytes on an idle pooled connection ---------------------------------------------------


def speaks_out_of_turn(stray_sent: threading.Event) -> Handler:
    """Answers each request with ``real <connection> <n>``; after the first answer on a
    connection, sends a whole unsolicited response (``STRAY``) while the connection is idle."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while await read_request(reader) is not None:
            n += 1
            writer.write(answer(200, f"real {CONNECTION_INDEX.get()} {n}".encode()))
            await writer.drain()
            if n == 1:
                await asyncio.sleep(0.05)
                writer.write(answer(200, b"STRAY"))
                await writer.drain()
                stray_sent.set()

    return handler


def test_stray_bytes_on_an_idle_pooled_connection_never_reach_the_next_request(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    stray_sent = threading.Event()
    backend = raw_backend(speaks_out_of_turn(stray_sent))
    proxy = portico(app_config([backend.url], outlier=NO_OUTLIER))
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        first = conn.request("GET", "/one")
        assert first.body == b"real 0 1", first.raw[:300]
        assert stray_sent.wait(5)
        # The stray bytes are on Portico's side of the socket well before this returns.
        wait_until(lambda: backend.records[0].closed, 5, message="the spoiled conn closed")
        second = conn.request("GET", "/two")
    assert second.status == 200 and second.body == b"real 1 1", second.raw[:300]


# --- client half-close ----------------------------------------------------------------------------


def answer_after(delay: float) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            await asyncio.sleep(delay)
            writer.write(answer(200, f"{req.method} {req.target} {len(req.body)}".encode()))
            await writer.drain()

    return handler


@pytest.mark.parametrize("body", [b"", b"half-closed upload"])
def test_client_half_close_after_a_full_request_still_gets_the_response(
    raw_backend: RawBackendFactory, portico: PorticoFactory, body: bytes
) -> None:
    backend = raw_backend(answer_after(0.3))
    proxy = portico(app_config([backend.url], outlier=NO_OUTLIER, retry={"attempts": 1}))
    method = "POST" if body else "GET"
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        conn.send(build_request(method, "/half", body=body))
        conn.shutdown_write()
        resp = conn.recv_response()
        assert resp.status == 200, resp.raw[:300]
        assert resp.body == f"{method} /half {len(body)}".encode()
        assert conn.closed(timeout=CLIENT_TIMEOUT), "Portico kept a half-closed connection open"
        assert conn.pending == b""
    assert backend.connections == 1


# --- active health checks: timeouts and bad answers -----------------------------------------------


def sick_health(kind: str, name: str) -> Handler:
    """Ordinary requests answered 200 with ``name``; ``/health`` answered badly: ``hang`` (never),
    ``garbage`` (not HTTP), ``truncated`` (a head promising more body than comes, then close)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            if req.target != "/health":
                writer.write(answer(200, name.encode(), backend=name))
                await writer.drain()
                continue
            if kind == "hang":
                while await reader.read(65536):
                    pass
            elif kind == "garbage":
                writer.write(b"\x00\x01 not http at all\r\n\r\n")
            elif kind == "truncated":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nok")
            await writer.drain()
            return

    return handler


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("hang", "timed out after 0.3s"), ("garbage", ""), ("truncated", "closed")],
)
def test_active_checks_mark_an_endpoint_down_on_timeouts_and_bad_answers(
    raw_backend: RawBackendFactory, portico: PorticoFactory, kind: str, reason: str
) -> None:
    sick = raw_backend(sick_health(kind, "sick"))
    healthy = Steerable(raw_backend, "healthy")
    checks = {"interval": 0.1, "timeout": 0.3, "jitter": 0.0, "rise": 1, "fall": 2}
    proxy = portico(app_config([sick.url, healthy.url], health=checks, outlier=NO_OUTLIER))
    label = f"127.0.0.1:{sick.port}"
    down = wait_until(
        lambda: [t for t in health_transitions(proxy, label) if t.startswith("DOWN")],
        5,
        message=f"{label} DOWN",
    )
    assert down[0].startswith("DOWN after 2 failed checks: "), down
    assert reason in down[0], down
    assert [t for t in health_transitions(proxy, healthy.label)] == []
    answered = [served_by(request(proxy.port, "GET", "/")) for _ in range(6)]
    assert answered == ["healthy"] * 6
    # Ordinary requests still worked on the sick one: only the checks condemned it.
    assert request(sick.port, "GET", "/x").status == 200
