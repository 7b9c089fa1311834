"""Reload over real sockets and real processes: every config section changes under load with
no failed request (one worker and two), a bad config is refused and the old one kept, static
keys are reported and keep their running values, apps come and go with the config.

A reload is a SIGHUP to Portico (the master when there are workers) after rewriting its
config file. With two workers, fresh connections land on either (SO_REUSEPORT), so an effect
counts as applied only when a run of fresh connections all show it.
"""

from __future__ import annotations

import copy
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import FLASK_APP_DIR
from tests.support.fleet import Steerable, fleet, log_lines, served_by, wait_for_log
from tests.support.ports import free_port
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection, RawResponse
from tests.support.tomlwriter import dumps
from tests.support.waiting import port_accepts, wait_until

# Seconds any one answer may take; far above what these backends need.
CLIENT_TIMEOUT = 5.0
# Seconds a reload's effect may take to show on every worker of a loaded machine.
SOON = 10.0


class Load:
    """Clients sending GETs in a loop until stopped, bounded in count and time: each thread
    reuses a keep-alive connection for ``per_connection`` requests, then opens a new one.
    Every answer that is not a 200 (or no answer) is kept in ``failures``."""

    def __init__(
        self,
        port: int,
        *,
        threads: int = 3,
        per_connection: int = 20,
        # High enough that a fast machine does not run out during the test (it did at 20,000
        # and the load stopped before the last reload); the time bound stays.
        max_requests: int = 500_000,
        max_seconds: float = 90.0,
        target: str = "/load",
    ) -> None:
        self.port = port
        self.per_connection = per_connection
        self.max_requests = max_requests
        self.deadline = time.monotonic() + max_seconds
        self.target = target
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT * 2)

    def _more(self) -> bool:
        with self.lock:
            if (
                self.stopping.is_set()
                or self.sent >= self.max_requests
                or time.monotonic() > self.deadline
            ):
                return False
            self.sent += 1
            return True

    def _run(self) -> None:
        while not self.stopping.is_set():
            with RawConnection(self.port, timeout=CLIENT_TIMEOUT) as conn:
                for _ in range(self.per_connection):
                    if not self._more():
                        return
                    try:
                        resp = conn.request("GET", self.target)
                    except Exception as exc:  # any failure is the test's finding
                        with self.lock:
                            self.failures.append(f"{type(exc).__name__}: {exc}")
                        break
                    if resp.status != 200:
                        with self.lock:
                            self.failures.append(f"{resp.status} {resp.raw[:200]!r}")
                    if resp.header("Connection") == "close":
                        break


def get(port: int, target: str = "/", headers: list[tuple[str, str]] | None = None) -> RawResponse:
    with RawConnection(port, timeout=CLIENT_TIMEOUT) as conn:
        return conn.request("GET", target, headers or [])


def everywhere(check: Callable[[], bool], what: str, runs: int = 12) -> None:
    """Wait until ``runs`` fresh connections in a row all pass ``check`` (every worker)."""
    wait_until(lambda: all(check() for _ in range(runs)), SOON, message=what)


class Reloader:
    """Rewrites the proxy's config file and SIGHUPs it; waits for the master's "reloaded"
    line and, with workers, for every worker's "runs the reloaded config" line."""

    def __init__(self, proxy: PorticoProcess, workers: int) -> None:
        self.proxy = proxy
        self.workers = workers
        self.data = copy.deepcopy(proxy.config)

    def __call__(self, change: Callable[[dict[str, Any]], None]) -> None:
        proxy = self.proxy
        done = len(log_lines(proxy, "reloaded "))
        applied = len(log_lines(proxy, "runs the reloaded config"))
        change(self.data)
        proxy.config_path.write_text(dumps(self.data))
        proxy.process.signal(signal.SIGHUP)
        wait_for_log(proxy, "reloaded ", count=done + 1, timeout=SOON)
        if self.workers > 1:
            wait_for_log(
                proxy, "runs the reloaded config", count=applied + self.workers, timeout=SOON
            )


@pytest.fixture
def steerable(raw_backend: RawBackendFactory) -> Callable[..., list[Steerable]]:
    return lambda *names: fleet(raw_backend, *names)


def base_config(a: Steerable, b: Steerable, log_path: Path) -> dict[str, Any]:
    return {
        "server": {
            "listen": [f"127.0.0.1:{free_port()}"],
            "shutdown_grace": 2.0,
            "limits": {"max_headers": 50},
            "timeouts": {"keepalive": 30.0},
        },
        "access_log": {"format": "common", "path": str(log_path)},
        "forwarding": {"via": False},
        "upstreams": {"a": {"backends": [a.url]}, "b": {"backends": [b.url]}},
        "routes": [{"path": "/", "upstream": "a"}],
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_of_each_section_under_load_fails_no_request(
    workers: int,
    steerable: Callable[..., list[Steerable]],
    portico: PorticoFactory,
    tmp_path: Path,
) -> None:
    a, b, c = steerable("a", "b", "c")
    proxy = portico(base_config(a, b, tmp_path / "first.log"), workers=workers)
    reload = Reloader(proxy, workers)
    many_headers = [(f"X-H{i}", "v") for i in range(20)]
    assert get(proxy.port, "/", many_headers).status == 200

    kept = RawConnection(proxy.port, timeout=CLIENT_TIMEOUT)  # open across the reloads
    assert kept.request("GET", "/").status == 200
    with kept, Load(proxy.port) as load:
        wait_until(lambda: load.sent > 50, SOON, message="the load to start")

        # server.limits: 20 header fields become too many, also on a connection kept open.
        reload(lambda d: d["server"]["limits"].update(max_headers=10))
        everywhere(lambda: get(proxy.port, "/", many_headers).status == 431, "max_headers")
        assert kept.request("GET", "/", many_headers).status == 431

        # server.timeouts: an idle keep-alive connection is now closed after 1 s.
        reload(lambda d: d["server"]["timeouts"].update(keepalive=1.0))

        def idle_closed() -> bool:
            with RawConnection(proxy.port, timeout=CLIENT_TIMEOUT) as conn:
                assert conn.request("GET", "/").status == 200
                return conn.closed(timeout=3.0)

        everywhere(idle_closed, "the new keep-alive timeout", runs=4)

        # access_log: another file, another format.
        second = tmp_path / "second.log"
        reload(lambda d: d["access_log"].update(format="json", path=str(second)))

        def logged_as_json() -> bool:
            get(proxy.port, "/json-marker")
            if not second.exists():
                return False
            lines = [line for line in second.read_text().splitlines() if "json-marker" in line]
            return bool(lines) and all(json.loads(line) for line in lines)

        wait_until(logged_as_json, SOON, message="JSON lines in the new access log")

        # forwarding: Via is now added to requests and responses.
        reload(lambda d: d["forwarding"].update(via=True))
        everywhere(lambda: get(proxy.port, "/").header("Via") == "1.1 portico", "Via")

        # routes: /b/ now goes to upstream b.
        reload(lambda d: d["routes"].insert(0, {"path": "/b/", "upstream": "b"}))
        everywhere(lambda: served_by(get(proxy.port, "/b/x")) == "b", "the new route")

        # upstreams: a's backend replaced by c.
        reload(lambda d: d["upstreams"]["a"].update(backends=[c.url]))
        everywhere(lambda: served_by(get(proxy.port, "/")) == "c", "the new backend")
        served_by_a = a.board.served("/load")
        on_c = c.board.served("/load")
        wait_until(lambda: c.board.served("/load") > on_c + 50, SOON, message="load on c")
        assert a.board.served("/load") == served_by_a
        sent = load.sent

    assert load.failures == [], f"{len(load.failures)} of {sent}: {load.failures[:5]}"
    assert sent > 200, f"only {sent} requests under load"
    # The first access log got the lines of the first config, in its format (not JSON).
    first_lines = (tmp_path / "first.log").read_text().splitlines()
    assert any('"GET /load HTTP/1.1" 200' in line for line in first_lines), first_lines[:3]
    assert not any("json-marker" in line for line in first_lines)
    assert proxy.process.alive()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_refused_reload_keeps_the_old_config_and_says_why(
    workers: int,
    steerable: Callable[..., list[Steerable]],
    portico: PorticoFactory,
    tmp_path: Path,
) -> None:
    a, b = steerable("a", "b")
    proxy = portico(base_config(a, b, tmp_path / "access.log"), workers=workers)
    data = copy.deepcopy(proxy.config)
    data["upstreams"]["a"]["backends"] = [b.url]
    data["routes"].append({"path": "/x/", "upstream": "nowhere"})
    proxy.config_path.write_text(dumps(data))
    proxy.process.signal(signal.SIGHUP)
    [line] = wait_for_log(proxy, "reload refused", timeout=SOON)
    assert "routes[1].upstream: no upstream named 'nowhere'" in line
    assert all(served_by(get(proxy.port, "/")) == "a" for _ in range(12))
    assert b.board.served() == 0
    assert not log_lines(proxy, "runs the reloaded config")


def test_a_config_larger_than_a_pipe_buffer_reaches_every_worker_every_time(
    steerable: Callable[..., list[Steerable]], portico: PorticoFactory, tmp_path: Path
) -> None:
    a, b = steerable("a", "b")
    config = base_config(a, b, tmp_path / "access.log")
    # 150 upstreams and routes: the config travels to the workers as a message of about
    # 190 KB, three times a pipe's 64 KiB buffer.
    for i in range(150):
        config["upstreams"][f"u{i}"] = {"backends": [b.url]}
        config["routes"].insert(0, {"path": f"/u{i}/", "upstream": f"u{i}"})
    proxy = portico(config, workers=2)
    reload = Reloader(proxy, 2)  # waits for both workers' "runs the reloaded config"
    for keepalive in (10.0, 11.0, 12.0):
        reload(lambda d, k=keepalive: d["server"]["timeouts"].update(keepalive=k))
    reload(lambda d: d["routes"].insert(0, {"path": "/new/", "upstream": "b"}))
    everywhere(lambda: served_by(get(proxy.port, "/new/x")) == "b", "the last reload")


def test_static_keys_are_reported_and_the_rest_applied(
    steerable: Callable[..., list[Steerable]], portico: PorticoFactory, tmp_path: Path
) -> None:
    a, b = steerable("a", "b")
    proxy = portico(base_config(a, b, tmp_path / "access.log"))
    reload = Reloader(proxy, 1)
    other = free_port()

    def change(d: dict[str, Any]) -> None:
        d["server"].update(listen=[f"127.0.0.1:{other}"], workers=2, backlog=16)
        d["upstreams"]["a"]["backends"] = [b.url]

    reload(change)
    for key in ("server.listen", "server.workers", "server.backlog"):
        assert log_lines(proxy, f"{key} changed: takes effect on restart only"), key
    [line] = log_lines(proxy, "reloaded ")
    assert line.endswith(": upstreams"), line  # server runs as before: only static keys changed
    everywhere(lambda: served_by(get(proxy.port, "/")) == "b", "the new backend")
    assert not port_accepts(other)
    # Static keys keep their running values: the next reload does not report them again.
    reload(lambda d: d["server"]["timeouts"].update(keepalive=5.0))
    assert len(log_lines(proxy, "server.listen changed")) == 2  # the file still differs
    assert len(log_lines(proxy, "server.pid_file changed")) == 0


# --- apps --------------------------------------------------------------------------------------

FLASK_APP = {
    "wsgi": "app:app",
    "cwd": str(FLASK_APP_DIR),
    "ready_interval": 0.05,
    "ready_timeout": 15.0,
    "drain_timeout": 3.0,
    "stop_timeout": 3.0,
}


def instance_pid(port: int) -> int:
    resp = get(port, "/whoami")
    assert resp.status == 200, resp.raw[:300]
    pid = json.loads(resp.body)["pid"]
    assert isinstance(pid, int)
    return pid


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("workers", [1, 2])
def test_apps_added_changed_and_removed_by_reload(
    workers: int,
    steerable: Callable[..., list[Steerable]],
    portico: PorticoFactory,
    tmp_path: Path,
) -> None:
    a, b = steerable("a", "b")
    proxy = portico(base_config(a, b, tmp_path / "access.log"), workers=workers)
    reload = Reloader(proxy, workers)
    assert get(proxy.port, "/whoami").header("X-Backend") == "a"

    def add(d: dict[str, Any]) -> None:
        d["upstreams"]["flask"] = {"app": {**FLASK_APP, "min": 1}}
        d["routes"].insert(0, {"path": "/whoami", "upstream": "flask"})

    reload(add)
    wait_until(lambda: get(proxy.port, "/whoami").status == 200, 30, message="the app to serve")
    first = instance_pid(proxy.port)
    everywhere(lambda: instance_pid(proxy.port) == first, "every worker to reach the app")

    # Changed: replaced by a new instance; the old one stops only after the new one is ready.
    with Load(proxy.port, target="/whoami", threads=2) as load:
        wait_until(lambda: load.sent > 20, SOON, message="load on the app")
        reload(lambda d: d["upstreams"]["flask"]["app"].update(env={"CHANGED": "1"}))
        wait_until(lambda: gone(first), 30, message="the old instance to stop")
        second = instance_pid(proxy.port)
        assert second != first
    assert load.failures == [], load.failures[:5]

    # Removed: its instance drains and stops; its route is gone with it.
    def remove(d: dict[str, Any]) -> None:
        del d["upstreams"]["flask"]
        del d["routes"][0]

    reload(remove)
    everywhere(lambda: get(proxy.port, "/whoami").header("X-Backend") == "a", "route removed")
    wait_until(lambda: gone(second), 30, message="the removed app's instance to stop")
    assert proxy.process.alive()
