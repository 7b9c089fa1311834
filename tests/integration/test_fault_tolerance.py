"""Fault tolerance over real sockets: killed backends, active and passive health checks,
retries and their safety rule, the retry budget, flapping, the circuit breaker, "nothing
healthy", checks with several workers, and draining by reload.

The rules under test are in docs/load-balancing.md. Backends are real gunicorn + Flask
processes (killed with SIGKILL where a test needs a crash) and raw asyncio servers steered
while the test runs (``tests/support/fleet.py``: health status, answer status, held requests).
Check intervals, ejection times and timeouts are fractions of a second, set through config;
every wait polls a condition with a deadline, and every load loop is bounded in requests and
time.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self

import psutil
import pytest

from tests.conftest import GunicornFactory, PorticoFactory, RawBackendFactory
from tests.support.backends import GunicornFlask, Handler, echo_http, read_request
from tests.support.behaviours import reset
from tests.support.fleet import (
    CLIENT_TIMEOUT,
    app_config,
    backends_of,
    fleet,
    health_transitions,
    hold_slow_request,
    log_lines,
    reload_with,
    request,
    served_by,
    spread,
    wait_for_log,
)
from tests.support.ports import free_port
from tests.support.processes import listening_workers
from tests.support.rawhttp import RawConnection, RawResponse, build_request
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

# Active checks fast enough that a flip takes a fraction of a second; no jitter, so the
# number of checks in a window is predictable.
CHECKS: dict[str, Any] = {"interval": 0.1, "timeout": 0.5, "jitter": 0.0, "rise": 2, "fall": 3}
# Passive outlier detection off, for tests about something else that make backends fail.
NO_OUTLIER = {"consecutive_failures": 0}
# An answer Portico must give "at once" (not queued behind a held request, not after a
# timeout) arrives well within this; a queued one would wait for CLIENT_TIMEOUT.
AT_ONCE = 1.0


def assert_503_at_once(port: int, target: str = "/") -> RawResponse:
    started = time.monotonic()
    resp = request(port, "GET", target)
    elapsed = time.monotonic() - started
    assert resp.status == 503, resp.raw[:300]
    retry_after = resp.header("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) > 0, resp.raw
    assert elapsed < AT_ONCE, f"503 took {elapsed:.2f}s"
    return resp


# --- a killed backend under steady load ------------------------------------------------------


class SteadyLoad:
    """``threads`` clients sending ``GET target`` back to back, each on its own keep-alive
    connection, until stopped, ``limit`` requests in all, or ``deadline`` seconds. Records the
    backend that served each 200 (completion order) and every other outcome as a failure."""

    def __init__(
        self, port: int, target: str, threads: int = 3, limit: int = 600, deadline: float = 20.0
    ) -> None:
        self.port = port
        self.target = target
        self.limit = limit
        self.deadline = time.monotonic() + deadline
        self.served: list[str] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT + 1)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.served) + len(self.failures)

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        wait_until(lambda: self.count >= n, timeout, message=f"{n} requests through the load")

    def _more(self) -> bool:
        return (
            not self._stop.is_set() and self.count < self.limit and time.monotonic() < self.deadline
        )

    def _client(self) -> None:
        conn: RawConnection | None = None
        while self._more():
            try:
                if conn is None:
                    conn = RawConnection(self.port, timeout=CLIENT_TIMEOUT)
                resp = conn.request("GET", self.target)
                outcome = served_by(resp) if resp.status == 200 else None
                failure = None if outcome else f"status {resp.status}: {resp.raw[:200]!r}"
            except Exception as exc:  # any client-visible error is a failed request
                failure, outcome = f"{type(exc).__name__}: {exc}", None
                if conn is not None:
                    conn.close()
                conn = None
            with self._lock:
                if outcome is not None:
                    self.served.append(outcome)
                else:
                    self.failures.append(failure or "?")
        if conn is not None:
            conn.close()


def test_killing_one_of_three_backends_under_load_fails_no_request(
    flask_backends: list[GunicornFlask], gunicorn_flask: GunicornFactory, portico: PorticoFactory
) -> None:
    a, b = flask_backends[:2]
    victim = gunicorn_flask("victim")
    proxy = portico(app_config([a.url, b.url, victim.url]))
    with SteadyLoad(proxy.port, "/whoami", threads=3, limit=600) as load:
        load.wait_for(60)
        victim.process.kill()  # SIGKILL to gunicorn's whole process group: a crash
        killed_at = load.count
        load.wait_for(killed_at + 150)
    assert load.failures == [], load.failures[:5]
    before, after = load.served[:killed_at], load.served[killed_at + 3 :]  # 3 were in flight
    assert before.count("victim") >= 10, f"the victim took no real share: {before}"
    assert set(after) == {"a", "b"}, f"after the kill: {sorted(set(after))}"
    # Not vacuous: Portico did send requests to the dead backend after the kill (it ejected
    # it after 5 failed tries, refused connects or resets of requests in flight) and every
    # one of those was retried on another backend.
    [ejected] = log_lines(proxy, f"app 127.0.0.1:{victim.port} ejected")
    assert "after 5 consecutive failures: " in ejected, ejected


# --- active health checks ---------------------------------------------------------------------


def test_active_checks_take_a_500ing_backend_out_and_bring_it_back_after_rise(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    a, b = fleet(raw_backend, "a", "b")
    proxy = portico(app_config([a.url, b.url], health=CHECKS, outlier=NO_OUTLIER))
    assert spread(proxy.port, 10) == {"a": 5, "b": 5}

    b.board.health = 500  # its real answers stay 200: only the active checks can see this
    failing_from = b.board.check_count()
    [down] = wait_for_log(proxy, f"app {b.label} DOWN")
    assert down.endswith(f"app {b.label} DOWN after 3 failed checks: status 500"), down
    assert b.board.check_count() >= failing_from + 3
    served = b.board.served()
    assert spread(proxy.port, 10) == {"a": 10}
    assert b.board.served() == served

    b.board.health = 200
    passing_from = b.board.check_count()
    [up] = wait_for_log(proxy, f"app {b.label} UP")
    assert up.endswith(f"app {b.label} UP after 2 passed checks: status 200"), up
    assert b.board.check_count() >= passing_from + 2, "came back before `rise` passes"
    assert spread(proxy.port, 10) == {"a": 5, "b": 5}

    b.server.stop()  # nothing listens on its port any more
    [_, down] = wait_for_log(proxy, f"app {b.label} DOWN", count=2)
    assert down.endswith(f"app {b.label} DOWN after 3 failed checks: connect refused"), down
    assert spread(proxy.port, 10) == {"a": 10}
    assert health_transitions(proxy, a.label) == []


def test_a_flapping_backend_does_not_flip_faster_than_rise_and_fall_allow(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    """rise = 2, fall = 3. ``flapping`` alternates pass and fail: never two in a row, so it
    must never flip. ``bursts`` fails 3 then passes 2, over and over: it must flip on exactly
    the 3rd failure and the 2nd pass of each round, no sooner and no more often."""
    flapping, bursts = fleet(raw_backend, "flapping", "bursts")
    flapping.board.health = lambda n: 200 if n % 2 else 500
    bursts.board.health = lambda n: 500 if (n - 1) % 5 < 3 else 200
    checks = {**CHECKS, "interval": 0.05}
    proxy = portico(app_config([flapping.url, bursts.url], health=checks, outlier=NO_OUTLIER))

    wait_until(
        lambda: min(flapping.board.check_count(), bursts.board.check_count()) >= 25,
        timeout=10,
        message="25 checks of each backend",
    )
    done_before = bursts.board.check_count() - 1  # every check before the last is logged
    seen = health_transitions(proxy, bursts.label)
    done_after = bursts.board.check_count()

    def allowed(checks_done: int) -> int:
        # DOWN on checks 3, 8, 13...; UP on checks 5, 10, 15...
        return sum(1 for n in range(1, checks_done + 1) if n % 5 in (3, 0))

    assert allowed(done_before) <= len(seen) <= allowed(done_after), (
        f"{len(seen)} transitions after {done_before}-{done_after} checks: {seen}"
    )
    assert len(seen) >= 8
    down, up = "DOWN after 3 failed checks: status 500", "UP after 2 passed checks: status 200"
    assert seen == [down, up] * (len(seen) // 2) + [down] * (len(seen) % 2)
    assert health_transitions(proxy, flapping.label) == []
    assert flapping.board.check_count() >= 25


def test_nothing_healthy_is_503_at_once_with_retry_after(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    a, b = fleet(raw_backend, "a", "b", health=500)
    proxy = portico(app_config([a.url, b.url], health={**CHECKS, "fall": 1}))
    wait_for_log(proxy, f"app {a.label} DOWN after 1 failed check: status 500")
    wait_for_log(proxy, f"app {b.label} DOWN after 1 failed check: status 500")
    for _ in range(3):
        assert_503_at_once(proxy.port)
    assert a.board.served() == b.board.served() == 0


# --- passive health: outlier detection -----------------------------------------------------------


def test_outlier_detection_ejects_a_backend_answering_503_and_returns_it(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    a, b = fleet(raw_backend, "a", "b")
    b.board.status = 503
    outlier = {"consecutive_failures": 3, "base_ejection": 1.0, "max_ejection": 2.0}
    proxy = portico(app_config([a.url, b.url], outlier=outlier))

    # Round robin sends every other request to b; each 503 is retried on a, so clients see
    # only a's answers while b collects its 3 consecutive failures.
    assert spread(proxy.port, 6) == {"a": 6}
    assert b.board.served() == 3
    [ejected] = wait_for_log(proxy, f"app {b.label} ejected")
    assert ejected.endswith(
        f"app {b.label} ejected for 1s after 3 consecutive failures: status 503"
    ), ejected
    # Ejected: b gets nothing at all (these take a fraction of the 1 s ejection).
    assert spread(proxy.port, 10) == {"a": 10}
    assert b.board.served() == 3

    b.board.status = 200
    wait_for_log(proxy, f"app {b.label} back after ejection")
    assert spread(proxy.port, 10) == {"a": 5, "b": 5}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_passing_active_check_ends_an_ejection_at_once(
    workers: int, raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    a, b = fleet(raw_backend, "a", "b")
    interval = 0.5
    checks = {"interval": interval, "timeout": 0.5, "jitter": 0.0, "rise": 1, "fall": 1000}
    # An ejection far longer than the test: only a passing check can bring b back in time.
    outlier = {"consecutive_failures": 2, "base_ejection": 60.0, "max_ejection": 60.0}
    config = app_config([a.url, b.url], health=checks, outlier=outlier)
    config["server"]["listen"] = [f"127.0.0.1:{free_port()}"]
    proxy = portico(config, workers=workers)

    b.board.status = 503
    b.board.health = 503  # fall is never reached: b stays UP for the active checker
    # Each worker ejects b on its own traffic; fresh connections reach every worker in time
    # (clients see only a meanwhile: each 503 is retried there).
    ejected = f"app {b.label} ejected for 60s"
    wait_until(
        lambda: served_by(request(proxy.port)) == "a"
        and len(log_lines(proxy, ejected)) >= workers,
        timeout=15,
        message="b ejected by every worker",
    )
    served = b.board.served()
    b.board.status = 200
    b.board.health = 200
    revived = time.monotonic()
    wait_until(
        lambda: served_by(request(proxy.port)) == "b" or b.board.served() > served,
        timeout=10,
        interval=0.02,
        message="b to get traffic again",
    )
    # Within one check interval (plus slack for a loaded machine), not after the 60 s.
    took = time.monotonic() - revived
    assert took < interval + 2 * AT_ONCE, f"b got traffic {took:.2f}s after it revived"
    assert log_lines(proxy, f"app {b.label} back after ejection: active check passed")
    assert spread(proxy.port, 20)["b"] > 0


# --- retries and their safety rule ----------------------------------------------------------


def reset_after_request() -> Handler:
    """Read one whole request, then reset the connection without a byte of response: a
    backend that may have acted on the request and died before answering."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is not None:
            reset(writer)

    return handler


@pytest.mark.parametrize(
    ("method", "body", "replayed"),
    [
        ("POST", b"charge-the-card-once", False),
        ("POST", b"", False),
        # Idempotent, but its body was streamed to the dying backend: nothing left to replay.
        ("PUT", b"new-contents", False),
        ("GET", b"", True),
        ("DELETE", b"", True),
    ],
)
def test_a_request_that_reached_a_dying_backend_is_replayed_only_if_idempotent(
    raw_backend: RawBackendFactory,
    portico: PorticoFactory,
    method: str,
    body: bytes,
    replayed: bool,
) -> None:
    dying = raw_backend(reset_after_request())
    other = raw_backend(echo_http())
    proxy = portico(app_config([dying.url, other.url], outlier=NO_OUTLIER))
    target = f"/orders/{method.lower()}"
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        resp = conn.request(method, target, body=body)
        conn.closed(timeout=0.2)  # collects anything more that arrives meanwhile
        assert conn.pending == b"", "more than one response"
    # Round robin's first pick is the first backend: the request did reach the dying one.
    assert dying.all_received().startswith(f"{method} {target} HTTP/1.1\r\n".encode())
    assert dying.all_received().endswith(b"\r\n\r\n" + body)
    if replayed:
        assert resp.status == 200, resp.raw[:300]
        assert resp.json()["method"] == method and resp.json()["target"] == target
        assert other.connections == 1
    else:
        assert resp.status == 502, resp.raw[:300]
        assert other.connections == 0, "a non-idempotent request was replayed"


def test_a_post_whose_connect_failed_is_retried_elsewhere(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    refused = f"http://127.0.0.1:{free_port()}"  # nothing listens: connect is refused
    other = raw_backend(echo_http())
    proxy = portico(app_config([refused, other.url], outlier=NO_OUTLIER))
    body = b"order=42&" * 200
    for i in range(4):  # round robin: every other first pick is the refused backend
        resp = request(proxy.port, "POST", f"/orders/{i}", body=body)
        assert resp.status == 200, resp.raw[:300]
        echoed = resp.json()
        assert echoed["method"] == "POST" and echoed["target"] == f"/orders/{i}"
        assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    # Each POST reached a backend exactly once.
    assert other.all_received().count(b"POST /orders/") == 4


def test_a_503_is_retried_on_another_backend(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    sick, well = fleet(raw_backend, "sick", "well")
    sick.board.status = 503
    proxy = portico(app_config([sick.url, well.url], outlier=NO_OUTLIER))
    resp = request(proxy.port, "GET", "/once")
    assert (resp.status, served_by(resp)) == (200, "well")
    assert sick.board.served() == well.board.served() == 1


def test_a_503_from_every_gunicorn_backend_is_passed_on_once_after_all_attempts(
    flask_backends: list[GunicornFlask], portico: PorticoFactory
) -> None:
    proxy = portico(app_config([f.url for f in flask_backends], outlier=NO_OUTLIER))
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
        resp = conn.request("GET", "/status/503")
        # One well-formed 503 (the last try's), and not a byte of the discarded ones.
        assert (resp.status, resp.body) == (503, b"status 503\n"), resp.raw[:300]
        assert conn.pending == b""
        assert conn.request("GET", "/status/200").status == 200  # the connection is still good


def test_retries_are_bounded_by_attempts(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backends = fleet(raw_backend, "a", "b", "c", "d", status=503)
    proxy = portico(
        app_config([s.url for s in backends], outlier=NO_OUTLIER, retry={"attempts": 3})
    )
    resp = request(proxy.port, "GET", "/doomed")
    assert resp.status == 503 and resp.header("X-Backend") is not None  # the last try's answer
    tries = [s.board.served() for s in backends]
    assert sorted(tries) == [0, 1, 1, 1], f"tries per backend: {tries}"


def test_an_empty_retry_budget_retries_nothing(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    sick, well = fleet(raw_backend, "sick", "well")
    sick.board.status = 503
    budget = {"budget_percent": 0, "budget_min": 0}
    proxy = portico(app_config([sick.url, well.url], outlier=NO_OUTLIER, retry=budget))
    statuses = []
    for i in range(4):  # round robin alternates: two of these go to the sick backend first
        resp = request(proxy.port, "GET", f"/r{i}")
        statuses.append((resp.status, served_by(resp)))
    assert sorted(statuses) == [(200, "well"), (200, "well"), (503, "sick"), (503, "sick")]
    assert sick.board.served() == 2 and well.board.served() == 2


# --- circuit breaker ------------------------------------------------------------------------------


def test_max_requests_answers_503_at_once_instead_of_queueing(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    (only,) = fleet(raw_backend, "only")
    proxy = portico(app_config([only.url], max_requests=1))
    with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as slow:
        slow.send(build_request("GET", "/slow/report"))
        wait_until(lambda: only.board.served("/slow") == 1, message="the slow request held")
        assert_503_at_once(proxy.port, "/fast")
        assert only.board.served("/fast") == 0, "the second request reached the full backend"
        only.board.release.set()
        held = slow.recv_response()
        assert (held.status, served_by(held)) == (200, "only")
    # The slot is free again.
    assert served_by(request(proxy.port, "GET", "/fast")) == "only"


def test_max_requests_sends_the_overflow_to_another_backend(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backends = fleet(raw_backend, "a", "b")
    proxy = portico(app_config([s.url for s in backends], max_requests=1))
    slow, full, [other] = hold_slow_request(proxy.port, backends)
    with slow:
        # Round robin would send every other one of these to the full backend.
        assert spread(proxy.port, 6, "/fast") == {other.name: 6}
        full.board.release.set()
        assert served_by(slow.recv_response()) == full.name


# --- workers --------------------------------------------------------------------------------------


@pytest.fixture
def open_connections() -> Iterator[list[RawConnection]]:
    conns: list[RawConnection] = []
    yield conns
    for conn in conns:
        conn.close()


def test_with_two_workers_checks_run_once_and_every_worker_obeys_them(
    raw_backend: RawBackendFactory,
    portico: PorticoFactory,
    open_connections: list[RawConnection],
) -> None:
    interval, window = 0.2, 1.6
    a, b = fleet(raw_backend, "a", "b")
    checks = {**CHECKS, "interval": interval, "rise": 1, "fall": 1}
    proxy = portico(app_config([a.url, b.url], health=checks, outlier=NO_OUTLIER), workers=2)
    workers = wait_until(
        lambda: w if len(w := listening_workers(proxy.pid, proxy.port)) == 2 else None,
        10,
        message="two workers listening",
    )

    # One prober checks every `interval`; one per worker (or master plus workers) would
    # check two or three times as often.
    wait_until(
        lambda: a.board.checks and a.board.checks[-1] >= a.board.checks[0] + window,
        timeout=window + 5,
        message=f"{window}s of checks",
    )
    times = list(a.board.checks)
    in_window = [t for t in times if t <= times[0] + window]
    expected = window / interval + 1
    assert 0.6 * expected <= len(in_window) <= expected + 1, (
        f"{len(in_window)} checks in {window}s at interval {interval}: {in_window}"
    )
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= 0.8 * interval, f"checks closer than the interval: {gaps}"

    # The master's verdict reaches both workers: once b is DOWN, requests spread over many
    # connections (and so over both workers) never reach it.
    b.board.health = 500
    wait_for_log(proxy, f"app {b.label} DOWN after 1 failed check: status 500")
    served = b.board.served()
    for _ in range(40):
        conn = RawConnection(proxy.port, timeout=CLIENT_TIMEOUT)
        open_connections.append(conn)  # held open, so each worker's share can be counted
        resp = conn.request("GET", "/spread")
        assert (resp.status, served_by(resp)) == (200, "a"), resp.raw[:300]
    assert b.board.served() == served
    ours = {conn.sock.getsockname()[1] for conn in open_connections}
    per_worker = {
        pid: sum(
            1
            for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.laddr.port == proxy.port and c.raddr and c.raddr.port in ours
        )
        for pid in workers
    }
    assert sum(per_worker.values()) == 40 and all(per_worker.values()), per_worker
    # One prober, so one log line per transition, not one per worker.
    assert len(log_lines(proxy, f"app {b.label} DOWN")) == 1


# --- draining by reload -----------------------------------------------------------------------


def test_a_backend_removed_by_reload_finishes_its_in_flight_request(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backends = fleet(raw_backend, "a", "b")
    proxy = portico(app_config([s.url for s in backends], outlier=NO_OUTLIER))
    slow, busy, [stays] = hold_slow_request(proxy.port, backends, "/slow/export")
    with slow:
        reload_with(proxy, backends_of([stays.url]))
        assert spread(proxy.port, 10) == {stays.name: 10}
        assert busy.board.served() == 1

        busy.board.release.set()
        finished = slow.recv_response()
        assert (finished.status, served_by(finished), finished.body) == (
            200,
            busy.name,
            busy.name.encode(),
        )
    assert busy.board.served() == 1
