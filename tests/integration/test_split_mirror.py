"""Traffic split (weighted, optionally sticky per client) and mirroring, over real sockets.

Backends are raw asyncio servers, answering at once with a body naming them, so 10,000
requests take a few seconds: the client pipelines them in batches on one keep-alive
connection. The shadow of a mirror either never answers (to show the client does not wait for
it and that copies in flight are bounded) or is an ``echo_http`` that records each copy.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.backends import Handler, RawBackend, echo_http, never_respond
from tests.support.ports import free_port
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection, build_request
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

SPLIT_REQUESTS = 10_000
PIPELINE = 500  # requests written at once; their answers are read before the next batch
MIRROR_MAX = 2
# Far above any request here: a client that waited for the hanging shadow would show it.
MIRROR_TIMEOUT = 30.0
MIRROR_BRIEF = 0.5


def named(name: str) -> Handler:
    """Answers every request with its name, as fast as a Python backend can: requests here
    have no body, so each end of a head is one request to answer."""
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(name), name.encode())

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending = b""
        while data := await reader.read(65536):
            pending += data
            heads = pending.count(b"\r\n\r\n")
            if heads:
                pending = pending[pending.rindex(b"\r\n\r\n") + 4 :]
                writer.write(response * heads)
                await writer.drain()

    return handler


@pytest.fixture(scope="module")
def web() -> Iterator[RawBackend]:
    with RawBackend(named("web")) as backend:
        yield backend


@pytest.fixture(scope="module")
def canary() -> Iterator[RawBackend]:
    with RawBackend(named("canary")) as backend:
        yield backend


@pytest.fixture(scope="module")
def hanging_shadow() -> Iterator[RawBackend]:
    with RawBackend(never_respond()) as backend:
        yield backend


@pytest.fixture(scope="module")
def slow_shadow() -> Iterator[RawBackend]:
    with RawBackend(never_respond()) as backend:
        yield backend


@pytest.fixture(scope="module")
def shadow() -> Iterator[RawBackend]:
    with RawBackend(echo_http()) as backend:
        yield backend


@pytest.fixture(scope="module")
def proxy(
    web: RawBackend,
    canary: RawBackend,
    hanging_shadow: RawBackend,
    slow_shadow: RawBackend,
    shadow: RawBackend,
) -> Iterator[PorticoProcess]:
    def mirrored(name: str, upstream: str, **mirror: Any) -> dict[str, Any]:
        return {
            "name": name,
            "path": f"/{name}/",
            "upstream": "web",
            "mirror": {"upstream": upstream, **mirror},
        }

    config = {
        "server": {"shutdown_grace": 0.5},
        # Every test client is a trusted proxy, so X-Forwarded-For can play many clients.
        "forwarding": {"trusted_proxies": ["127.0.0.1"]},
        "upstreams": {
            "web": {"backends": [web.url]},
            "canary": {"backends": [canary.url]},
            "hanging": {"backends": [hanging_shadow.url]},
            "shadow": {"backends": [shadow.url]},
            "slow": {"backends": [slow_shadow.url]},
            "dead": {"backends": [f"http://127.0.0.1:{free_port()}"]},
        },
        "routes": [
            {
                "name": "split",
                "path": "/split/",
                "split": [{"upstream": "web", "weight": 90}, {"upstream": "canary", "weight": 10}],
            },
            {
                "name": "sticky",
                "path": "/sticky/",
                "split": [{"upstream": "web", "weight": 1}, {"upstream": "canary", "weight": 1}],
                "split_sticky": True,
            },
            {"name": "plain", "path": "/plain/", "upstream": "web"},
            mirrored("hang", "hanging", max_concurrent=MIRROR_MAX, timeout=MIRROR_TIMEOUT),
            mirrored("dead", "dead"),
            mirrored("brief", "slow", max_concurrent=1, timeout=MIRROR_BRIEF),
            mirrored("copy", "shadow", max_body_bytes=1024),
            mirrored("half", "shadow", percent=50),
        ],
    }
    with PorticoProcess(config) as proc:
        yield proc


def pipelined(port: int, targets: list[str], headers: dict[str, str] | None = None) -> list[str]:
    """Bodies of the answers to GET ``targets``, sent in pipelined batches on one connection."""
    bodies: list[str] = []
    with RawConnection(port, timeout=10.0) as conn:
        for start in range(0, len(targets), PIPELINE):
            batch = targets[start : start + PIPELINE]
            conn.send(b"".join(build_request("GET", t, headers or {}) for t in batch))
            for _ in batch:
                response = conn.recv_response()
                assert response.status == 200, response.raw
                bodies.append(response.body.decode())
    return bodies


def count_answers(port: int, n: int, connections: int = 4) -> Counter[str]:
    """Which backend answered each of ``n`` GET /split/i, pipelined on a few connections at
    once; answers are counted straight off the byte stream (parsing 10,000 responses in
    Python would take longer than serving them)."""
    per = n // connections
    with ThreadPoolExecutor(connections) as pool:
        parts = list(pool.map(lambda _: count_one_connection(port, per), range(connections)))
    return sum(parts, Counter())


def count_one_connection(port: int, n: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    markers = {name: b"\r\n\r\n" + name.encode() for name in ("web", "canary")}
    with RawConnection(port, timeout=10.0) as conn:
        for start in range(0, n, PIPELINE):
            batch = min(PIPELINE, n - start)
            conn.send(b"".join(build_request("GET", f"/split/{start + i}") for i in range(batch)))
            deadline = time.monotonic() + 10.0
            stream = b""
            while stream.count(b"HTTP/1.1 ") < batch or not stream.endswith((b"web", b"canary")):
                assert time.monotonic() < deadline, stream[-300:]
                stream += conn.sock.recv(1 << 20)
            assert stream.count(b"HTTP/1.1 200 OK\r\n") == batch, stream[:300]
            found = {name: stream.count(marker) for name, marker in markers.items()}
            assert sum(found.values()) == batch
            counts.update(found)
    return counts


# --- split ----------------------------------------------------------------------------------------


def test_split_90_10_over_10000_requests(proxy: PorticoProcess) -> None:
    started = time.monotonic()
    counts = count_answers(proxy.port, SPLIT_REQUESTS)
    elapsed = time.monotonic() - started
    assert set(counts) == {"web", "canary"}
    share = counts["canary"] / SPLIT_REQUESTS * 100
    assert 8.0 <= share <= 12.0, counts
    print(f"split: {dict(counts)} in {elapsed:.2f}s")


def test_split_shares_hold_in_every_window(proxy: PorticoProcess) -> None:
    # Not 90 in a row then 10: each block of 100 requests already carries the weights.
    bodies = pipelined(proxy.port, [f"/split/{i}" for i in range(500)])
    for start in range(0, 500, 100):
        assert 5 <= bodies[start : start + 100].count("canary") <= 15


def test_sticky_split_keeps_each_client_on_its_share(proxy: PorticoProcess) -> None:
    seen: dict[str, set[str]] = {}
    for n in range(40):
        client = f"198.51.100.{n}"
        answers = pipelined(proxy.port, ["/sticky/x"] * 5, {"X-Forwarded-For": client})
        seen[client] = set(answers)
    assert all(len(upstreams) == 1 for upstreams in seen.values()), seen
    shares = Counter(next(iter(s)) for s in seen.values())
    assert shares["web"] >= 5 and shares["canary"] >= 5, shares  # both halves get clients


# --- mirror ---------------------------------------------------------------------------------------


def timed_gets(port: int, target: str, n: int) -> list[float]:
    times = []
    with RawConnection(port, timeout=10.0) as conn:
        for _ in range(n):
            started = time.monotonic()
            response = conn.request("GET", target)
            times.append(time.monotonic() - started)
            assert response.status == 200 and response.body == b"web"
    return times


def test_a_hanging_shadow_neither_delays_the_client_nor_piles_up(
    proxy: PorticoProcess, hanging_shadow: RawBackend
) -> None:
    baseline = timed_gets(proxy.port, "/plain/x", 20)
    mirrored = timed_gets(proxy.port, "/hang/x", 20)
    # The shadow never answers and keeps its copies for MIRROR_TIMEOUT (30 s): had the client
    # waited for any of them, one request would take that long. The slack is for a loaded host.
    assert max(mirrored) < max(baseline) + 2.0, (baseline, mirrored)
    assert sum(mirrored) < 10.0
    hanging_shadow.wait_for_connections(MIRROR_MAX)
    # More requests while the first copies hang: none is copied beyond the bound.
    timed_gets(proxy.port, "/hang/x", 10)
    wait_until(
        lambda: all(b"GET /hang/x" in r for r in hanging_shadow.received[:MIRROR_MAX]),
        message="the copies to reach the shadow",
    )
    assert hanging_shadow.connections == MIRROR_MAX


def test_a_copy_is_abandoned_after_the_mirror_timeout(
    proxy: PorticoProcess, slow_shadow: RawBackend
) -> None:
    started = time.monotonic()
    timed_gets(proxy.port, "/brief/x", 3)  # one copy: the bound is 1
    slow_shadow.wait_for_connections(1)
    # Once the first copy times out (and its connection is closed) the next one goes out.
    wait_until(
        lambda: timed_gets(proxy.port, "/brief/x", 1) and slow_shadow.connections >= 2,
        timeout=5,
        interval=0.1,
        message="a second copy after the first timed out",
    )
    assert time.monotonic() - started >= MIRROR_BRIEF
    assert slow_shadow.records[0].peer_closed


def test_an_unreachable_shadow_does_not_fail_the_client(proxy: PorticoProcess) -> None:
    timed_gets(proxy.port, "/dead/x", 5)


def test_the_shadow_receives_a_copy_with_a_small_body(
    proxy: PorticoProcess, shadow: RawBackend
) -> None:
    body = b"mirrored body \x00\xff"
    big = b"B" * 2000  # above the route's mirror max_body_bytes: not copied
    with RawConnection(proxy.port) as conn:
        first = conn.request("POST", "/copy/small?q=1", {"X-Tag": "t1"}, body)
        second = conn.request("POST", "/copy/big", {"X-Tag": "t2"}, big)
        third = conn.request("GET", "/copy/get", {"X-Tag": "t3"})
    assert [r.body for r in (first, second, third)] == [b"web"] * 3

    def copies() -> list[bytes]:
        return [r for r in shadow.received if b"/copy/" in r]

    wait_until(lambda: len(copies()) >= 2, message="two copies at the shadow")
    small, get = sorted(copies(), key=lambda r: b"/copy/get" in r)
    head, _, sent_body = small.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /copy/small?q=1 HTTP/1.1\r\n")
    assert b"\r\nX-Tag: t1\r\n" in head
    assert b"\r\nConnection: close" in head
    assert sent_body == body
    assert get.startswith(b"GET /copy/get HTTP/1.1\r\n")
    # The big one was never copied, even later.
    timed_gets(proxy.port, "/plain/x", 3)
    assert not any(b"/copy/big" in r for r in shadow.received)


def test_mirror_percent(proxy: PorticoProcess, shadow: RawBackend) -> None:
    targets = [f"/half/{i}" for i in range(10)]
    pipelined(proxy.port, targets)
    wait_until(
        lambda: sum(b"GET /half/" in r for r in shadow.received) >= 5,
        message="half of the requests at the shadow",
    )
    timed_gets(proxy.port, "/plain/x", 3)
    assert sum(b"GET /half/" in r for r in shadow.received) == 5
