"""Per-route limits and safety over real sockets: timeouts, retries and body size overriding the
upstream's, the request deadline, the Upgrade allow-list and request IDs.

Backends are raw asyncio servers scripted for each case (slow, failing, hanging, switching
protocols); ``echo_http`` shows what reached the upstream.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PorticoFactory
from tests.support.backends import (
    OK_RESPONSE,
    RawBackend,
    echo_http,
    never_respond,
    read_request,
    respond,
)
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import (
    IncompleteResponse,
    RawConnection,
    RawResponse,
    build_request,
    chunked,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

TRUSTED_SOURCE = "127.0.0.2"
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")
SERVER_MAX_BODY = 1000
ROUTE_MAX_BODY = 100
UPSTREAM_HEADER_TIMEOUT = 0.5
DEADLINE = 2.0


async def sleepy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers after the number of seconds in the request's X-Sleep header."""
    while (request := await read_request(reader)) is not None:
        await asyncio.sleep(float(request.header("X-Sleep") or 0))
        writer.write(OK_RESPONSE)
        await writer.drain()


async def stalls_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A head promising 10 bytes, 2 of them, then nothing for a long time."""
    if await read_request(reader) is not None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        await writer.drain()
        await asyncio.sleep(30)


async def switches(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request with 101 (whatever it asked for), then echoes raw bytes."""
    request = await read_request(reader)
    if request is None:
        return
    protocol = request.header("Upgrade") or "h2c"
    writer.write(
        f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: {protocol}\r\n"
        "Connection: Upgrade\r\n\r\n".encode()
    )
    await writer.drain()
    while data := await reader.read(65536):
        writer.write(b"echo:" + data)
        await writer.drain()


STATUS_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, RawBackend]]:
    made = {
        "sleepy": RawBackend(sleepy),
        "stalls": RawBackend(stalls_body),
        "bad": RawBackend(respond(STATUS_503)),
        "good": RawBackend(respond(OK_RESPONSE)),
        "echo": RawBackend(echo_http()),
        "switches": RawBackend(switches),
        **{f"hang{i}": RawBackend(never_respond()) for i in range(3)},
    }
    try:
        for backend in made.values():
            backend.start()
        yield made
    finally:
        for backend in made.values():
            backend.stop()


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("limits") / "access.log"


@pytest.fixture(scope="module")
def proxy(backends: dict[str, RawBackend], log_path: Path) -> Iterator[PorticoProcess]:
    def upstream(*names: str, **settings: Any) -> dict[str, Any]:
        return {"backends": [backends[n].url for n in names], **settings}

    no_retry = {"attempts": 1}
    config = {
        "request_id": True,
        "server": {"shutdown_grace": 0.5, "limits": {"max_body_bytes": SERVER_MAX_BODY}},
        "forwarding": {"trusted_proxies": [TRUSTED_SOURCE]},
        "access_log": {"format": "json", "path": str(log_path)},
        "upstreams": {
            "sleepy": upstream(
                "sleepy",
                timeouts={"response_header": UPSTREAM_HEADER_TIMEOUT, "body_idle": 30},
                retry=no_retry,
            ),
            "stalls": upstream("stalls", timeouts={"body_idle": 30}, retry=no_retry),
            "flaky": upstream("bad", "good", balancer="round_robin", retry=no_retry),
            # Three backends that never answer: each try would wait 1.5 s, 4.5 s in all.
            "hanging": upstream(
                "hang0",
                "hang1",
                "hang2",
                balancer="round_robin",
                timeouts={"response_header": 5},
                retry={"attempts": 3, "per_try_timeout": 1.5},
            ),
            "echo": upstream("echo"),
            "switches": upstream("switches"),
        },
        "routes": [
            {"path": "/impatient/", "upstream": "sleepy"},
            {"path": "/patient/", "upstream": "sleepy", "timeouts": {"response_header": 5}},
            {"path": "/stall-default/", "upstream": "stalls"},
            {"path": "/stall/", "upstream": "stalls", "timeouts": {"body_idle": 0.5}},
            {"path": "/no-retry/", "upstream": "flaky"},
            {"path": "/retry/", "upstream": "flaky", "retry": {"attempts": 2, "on_status": [503]}},
            {"path": "/deadline/", "upstream": "hanging", "timeouts": {"deadline": DEADLINE}},
            {"path": "/upload/", "upstream": "sleepy", "timeouts": {"deadline": 1.0}},
            {"path": "/small/", "upstream": "echo", "max_body_bytes": ROUTE_MAX_BODY},
            {"path": "/switch/", "upstream": "switches"},
            {"path": "/h2c-allowed/", "upstream": "switches", "upgrades": ["websocket", "h2c"]},
            {"path": "/", "upstream": "echo"},
        ],
    }
    with PorticoProcess(config) as proc:
        yield proc


@pytest.fixture
def conn(proxy: PorticoProcess) -> Iterator[RawConnection]:
    with RawConnection(proxy.port, timeout=10.0) as c:
        yield c


def timed(conn: RawConnection, target: str, headers: dict[str, str]) -> tuple[RawResponse, float]:
    started = time.monotonic()
    response = conn.request("GET", target, headers)
    return response, time.monotonic() - started


# --- timeouts, retries, body size --------------------------------------------------------------- -


def test_route_response_header_timeout_overrides_the_upstreams(conn: RawConnection) -> None:
    slow = {"X-Sleep": "1.5"}  # above the upstream's 0.5 s, below the route's 5 s
    response, took = timed(conn, "/patient/x", slow)
    assert response.status == 200 and took >= 1.5
    with RawConnection(conn.sock.getpeername()[1], timeout=10.0) as other:
        response, took = timed(other, "/impatient/x", slow)
    assert response.status == 504
    assert UPSTREAM_HEADER_TIMEOUT <= took < 1.5


def test_route_body_idle_timeout_overrides_the_upstreams(proxy: PorticoProcess) -> None:
    with RawConnection(proxy.port, timeout=10.0) as c:
        started = time.monotonic()
        with pytest.raises(IncompleteResponse) as info:
            c.request("GET", "/stall/x")
        took = time.monotonic() - started
    assert info.value.partial.endswith(b"\r\n\r\nab")
    assert 0.4 <= took < 3.0
    # Without the route's override the upstream's 30 s apply: still waiting after 1.5 s.
    with RawConnection(proxy.port, timeout=1.5) as c, pytest.raises(TimeoutError):
        c.request("GET", "/stall-default/x")


def test_route_retry_overrides_the_upstreams(conn: RawConnection) -> None:
    # Round robin over a backend answering 503 and a good one; the upstream never retries.
    plain = [conn.request("GET", "/no-retry/x").status for _ in range(6)]
    assert sorted(plain) == [200, 200, 200, 503, 503, 503]
    retried = [conn.request("GET", "/retry/x").status for _ in range(6)]
    assert retried == [200] * 6


def test_route_max_body_bytes(proxy: PorticoProcess, backends: dict[str, RawBackend]) -> None:
    def status(target: str, body: bytes, framing: str = "length") -> int:
        with RawConnection(proxy.port) as c:
            headers = {"Transfer-Encoding": "chunked"} if framing == "chunked" else {}
            wire = chunked([body[:50], body[50:]]) if framing == "chunked" else body
            return c.request("POST", target, headers, wire).status

    assert status("/small/x", b"x" * ROUTE_MAX_BODY) == 200
    assert status("/small/too-big", b"x" * (ROUTE_MAX_BODY + 1)) == 413
    # A declared length over the limit is refused before anything goes upstream.
    assert not any(b"/small/too-big" in r for r in backends["echo"].received)
    assert status("/small/x", b"x" * (ROUTE_MAX_BODY + 1), "chunked") == 413
    assert status("/small/x", b"x" * ROUTE_MAX_BODY, "chunked") == 200
    assert status("/other", b"x" * 500) == 200  # other routes keep the server's limit
    assert status("/other", b"x" * (SERVER_MAX_BODY + 1)) == 413


def test_request_deadline_across_three_hanging_backends(
    conn: RawConnection, backends: dict[str, RawBackend]
) -> None:
    before = sum(backends[f"hang{i}"].connections for i in range(3))
    response, took = timed(conn, "/deadline/x", {})
    assert response.status == 504
    assert DEADLINE - 0.1 <= took < DEADLINE + 0.5, took
    assert GENERATED_ID.match(response.header("X-Request-ID") or "")  # errors carry the ID
    # It was retried on a second backend before the deadline cut it short.
    assert sum(backends[f"hang{i}"].connections for i in range(3)) - before == 2


def test_the_deadline_starts_when_the_request_body_has_been_sent(proxy: PorticoProcess) -> None:
    # An upload that takes longer than the deadline (1 s), with pauses shorter than the
    # upstream's response_header timeout (0.5 s): the backend answers once it has it all.
    pieces = [b"x" * 100] * 8
    with RawConnection(proxy.port, timeout=10.0) as c:
        c.send(b"POST /upload/x HTTP/1.1\r\nHost: t\r\nContent-Length: 800\r\n\r\n")
        started = time.monotonic()
        for piece in pieces:
            time.sleep(0.2)  # the client's pace is what this test is about
            c.send(piece)
        response = c.recv_response()
    assert time.monotonic() - started >= 1.5
    assert response.status == 200, response.raw


# --- Upgrade allow-list ---------------------------------------------------------------------------

H2C = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAAQ"}


def test_h2c_upgrade_is_stripped(conn: RawConnection) -> None:
    response = conn.request("GET", "/echo", H2C)
    assert response.status == 200
    sent = {k.lower() for k, _ in response.json()["headers"]}
    assert not sent & {"upgrade", "http2-settings", "connection"}
    # The connection stays plain HTTP, also for a request sent right behind the upgrade.
    conn.send(build_request("GET", "/echo", H2C) + build_request("GET", "/after"))
    assert conn.recv_response().json()["target"] == "/echo"
    assert conn.recv_response().json()["target"] == "/after"


def test_a_101_to_a_stripped_upgrade_is_refused(
    conn: RawConnection, backends: dict[str, RawBackend]
) -> None:
    before = backends["switches"].connections
    response = conn.request("GET", "/switch/x", H2C)
    assert response.status == 502
    wait_until(lambda: backends["switches"].connections > before)
    assert b"upgrade:" not in backends["switches"].received[-1].lower()


def tunnel(proxy: PorticoProcess, target: str, protocol: str) -> tuple[RawResponse, bytes]:
    with RawConnection(proxy.port) as c:
        response = c.request("GET", target, {"Connection": "Upgrade", "Upgrade": protocol})
        c.send(b"hello")
        deadline = time.monotonic() + 5
        while b"echo:hello" not in c.pending and c._fill(deadline):
            pass
        return response, c.pending


def test_websocket_is_still_tunnelled(proxy: PorticoProcess) -> None:
    response, echoed = tunnel(proxy, "/switch/ws", "websocket")
    assert response.status == 101
    assert response.header("Upgrade") == "websocket"
    assert echoed == b"echo:hello"


def test_a_route_may_allow_another_protocol(proxy: PorticoProcess) -> None:
    response, echoed = tunnel(proxy, "/h2c-allowed/x", "h2c")
    assert response.status == 101 and echoed == b"echo:hello"


# --- request IDs ----------------------------------------------------------------------------------


def log_entries(path: Path, markers: list[str]) -> dict[str, dict[str, Any]]:
    """The access log line of each marker's request, waiting for the once-a-second flush."""

    def find() -> dict[str, dict[str, Any]] | None:
        found: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                entry: dict[str, Any] = json.loads(line)
                found.update({m: entry for m in markers if f"/{m} " in entry["request"]})
        return found if len(found) == len(markers) else None

    entries = wait_until(find, timeout=5, message=f"access log lines for {markers}")
    assert entries is not None
    return entries


# (source address, X-Request-ID sent, kept?)
REQUEST_ID_CASES = [
    ("127.0.0.1", None, False),  # absent: generated
    (TRUSTED_SOURCE, None, False),
    (TRUSTED_SOURCE, "trace-abc-123", True),  # from a trusted network: kept
    ("127.0.0.1", "trace-abc-123", False),  # untrusted: replaced
    (TRUSTED_SOURCE, "x" * 201, False),  # trusted, but longer than an ID may be
    (TRUSTED_SOURCE, "has space", False),
]


def test_request_ids(proxy: PorticoProcess, log_path: Path) -> None:
    returned: dict[str, str] = {}
    for n, (source, sent, kept) in enumerate(REQUEST_ID_CASES):
        marker = f"rid-{n}"
        headers = {"X-Request-ID": sent} if sent is not None else {}
        with RawConnection(proxy.port, source=source) as c:
            response = c.request("GET", f"/{marker}", headers)
        assert response.status == 200
        (got,) = response.header_values("X-Request-ID")
        upstream = [v for k, v in response.json()["headers"] if k.lower() == "x-request-id"]
        assert upstream == [got], (source, sent)  # sent upstream, once
        if kept:
            assert got == sent
        else:
            assert GENERATED_ID.match(got), (source, sent, got)
        returned[marker] = got
    assert len(set(returned.values())) == len(REQUEST_ID_CASES)  # every generated ID is new
    logged = log_entries(log_path, list(returned))
    assert {m: e["request_id"] for m, e in logged.items()} == returned


def test_request_id_on_local_answers(conn: RawConnection) -> None:
    # A 413 for the route is answered by the gateway before any upstream: it still has an ID.
    response = conn.request("POST", "/small/x", {}, b"x" * (ROUTE_MAX_BODY + 1))
    assert response.status == 413
    assert GENERATED_ID.match(response.header("X-Request-ID") or "")


def test_request_id_on_answers_before_any_route(conn: RawConnection) -> None:
    # 400 for a path above the root is decided before routing: the global stage names it.
    response = conn.request("GET", "/%2e%2e/x")
    assert response.status == 400
    assert GENERATED_ID.match(response.header("X-Request-ID") or "")


def test_request_id_header_name_is_configurable(
    portico: PorticoFactory, backends: dict[str, RawBackend]
) -> None:
    proc = portico(
        {
            "request_id": {"header": "X-Trace"},
            "server": {"shutdown_grace": 0.5},
            "forwarding": {"trusted_proxies": [TRUSTED_SOURCE]},
            "upstreams": {"echo": {"backends": [backends["echo"].url]}},
        }
    )
    with RawConnection(proc.port, source=TRUSTED_SOURCE) as c:
        response = c.request("GET", "/", {"X-Trace": "kept-1", "X-Request-ID": "other"})
    assert response.header("X-Trace") == "kept-1"
    assert response.header("X-Request-ID") is None
    sent = [(k.lower(), v) for k, v in response.json()["headers"]]
    assert ("x-trace", "kept-1") in sent and ("x-request-id", "other") in sent
