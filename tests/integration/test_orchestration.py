"""Orchestration with real processes: ``portico run`` and ``[upstreams.NAME.app]`` start, heal,
roll and auto-scale app instances behind the proxy.

Instances are the real Flask demo under gunicorn (one sync worker each: one request at a time,
so a few slow requests keep an instance busy), a tiny ASGI app under uvicorn, and small raw
Python servers where timing must be controlled (readiness that fails for a while, commands
that crash). Every window is a fraction of a second through config; every wait polls a
condition with a deadline; every load loop is bounded in count and time.

What each Portico started is watched by PID from the outside (psutil, sampled in the
background while it runs), and ``fleet`` fails a test whose Portico leaves any process behind
after it stops.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.backends import FLASK_APP_DIR
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess, listening_workers, process_gone
from tests.support.proxy import PorticoProcess
from tests.support.waiting import port_accepts, wait_until

APP = "default"  # the upstream name `portico run` gives its app; the config files use it too
FLASK = {"wsgi": "app:app", "cwd": str(FLASK_APP_DIR)}

# Short windows for everything the supervisor waits on, so tests take fractions of a second.
FAST = {
    "ready_interval": 0.05,
    "ready_timeout": 15.0,
    "drain_timeout": 5.0,
    "stop_timeout": 3.0,
    "backoff_initial": 0.05,
    "backoff_max": 0.5,
    "crash_loop_after": 20,
    "cold_start_timeout": 15.0,
}
# How long processes get to disappear once they should (a stop, a kill, Portico's death).
GONE_WITHIN = 3.0
# Seconds a log line or state change may take to show up; generous for a loaded CI machine.
SOON = 10.0


def app_config(app: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    return {
        "server": {"shutdown_grace": 5.0},
        "upstreams": {APP: {"app": {**FAST, **app}, **upstream}},
    }


# --- the log ------------------------------------------------------------------------------------

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(line: str) -> float:
    """The wall-clock time (time.time() scale) of a Portico log line."""
    m = _STAMP.match(line)
    assert m is not None, f"not a log line: {line!r}"
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def lines_matching(output: str, pattern: str) -> list[re.Match[str]]:
    rx = re.compile(pattern)
    return [m for line in output.splitlines() if (m := rx.search(line))]


def instance_states(output: str) -> dict[str, str]:
    """Each instance id's last state as the supervisor logged it."""
    states: dict[str, str] = {}
    for line in output.splitlines():
        if m := re.search(r"\] (\S+) started on 127\.0\.0\.1:\d+$", line):
            states[m.group(1)] = "starting"
        elif m := re.search(r"\] (\S+) ready: taking traffic$", line):
            states[m.group(1)] = "ready"
        elif m := re.search(r"\] (\S+) (stopped \(|exited with |was not ready after)", line):
            states[m.group(1)] = "gone"
    return states


def ready_ids(output: str) -> set[str]:
    return {i for i, state in instance_states(output).items() if state == "ready"}


# --- clients ------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: bytes
    started: float  # time.time() when sent
    ended: float  # time.time() when the whole response was read

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


def get(port: int, target: str = "/whoami", timeout: float = 20.0) -> Reply:
    """One GET on a fresh connection."""
    started = time.time()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        body = response.read()
        return Reply(response.status, body, started, time.time())
    finally:
        conn.close()


def get_many(port: int, targets: list[str]) -> list[Reply | BaseException]:
    """``targets`` sent at once, one thread each; the replies in the same order."""
    out: list[Reply | BaseException] = [RuntimeError("not answered")] * len(targets)

    def one(i: int) -> None:
        try:
            out[i] = get(port, targets[i])
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


@dataclass
class Stream:
    """``threads`` clients sending GET ``target`` back to back until stopped, at most
    ``max_requests`` in all and for at most ``max_seconds``. Every outcome is kept."""

    port: int
    target: str = "/whoami"
    threads: int = 4
    max_requests: int = 5000
    max_seconds: float = 20.0
    replies: list[Reply] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Stream:
        deadline = time.monotonic() + self.max_seconds
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(deadline,), name=f"stream-{i}")
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if len(self.replies) + len(self.errors) >= self.max_requests:
                    return
            try:
                reply = get(self.port, self.target)
            except Exception as e:
                with self._lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
                continue
            with self._lock:
                self.replies.append(reply)

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(30)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.replies)

    def wait_for(self, n: int, timeout: float = SOON) -> None:
        """Wait until ``n`` more replies than now have arrived."""
        goal = self.count + n
        wait_until(lambda: self.count >= goal, timeout, message=f"{n} more replies")

    def failures(self) -> list[str]:
        with self._lock:
            bad = [f"{r.status} {r.body[:80]!r}" for r in self.replies if r.status != 200]
            return bad + list(self.errors)

    def since(self, t: float) -> list[Reply]:
        with self._lock:
            return [r for r in self.replies if r.started >= t]


# --- Portico and everything it started ------------------------------------------------------


class Fleet:
    """A running Portico (``serve -c`` or ``run``) and, by PID, every process it started.

    A daemon thread samples Portico's descendants while it runs, so even an instance that
    lived a fraction of a second is remembered and checked for at the end.
    """

    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.port = port
        self.seen: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._watching = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="fleet-watch")

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> Fleet:
        self.process.start()
        self._watching.set()
        self._watcher.start()
        try:
            wait_until(self._listening, 15, interval=0.02, message="portico to listen")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- portico output ---\n{self.output()}") from None
        return self

    def _listening(self) -> bool:
        if not self.process.alive():
            raise AssertionError(f"portico exited with {self.process.returncode}")
        return port_accepts(self.port)

    def _watch(self) -> None:
        while self._watching.is_set():
            self.sample()
            time.sleep(0.02)

    def sample(self) -> None:
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return
        with self._lock:
            for child in children:
                self.seen.setdefault(child.pid, child)

    def output(self) -> str:
        return self.process.output()

    def wait_log(self, pattern: str, count: int = 1, timeout: float = SOON) -> list[re.Match[str]]:
        """Wait until ``pattern`` matches ``count`` log lines; return every match."""

        def found() -> list[re.Match[str]]:
            if not self.process.alive():
                raise AssertionError(f"portico exited with {self.process.returncode}")
            matches = lines_matching(self.output(), pattern)
            return matches if len(matches) >= count else []

        try:
            return wait_until(found, timeout, interval=0.02, message=f"log: {pattern!r} x{count}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- portico output ---\n{self.output()}") from None

    def wait_ready(
        self, n: int, exclude: frozenset[str] | set[str] = frozenset(), timeout: float = SOON
    ) -> set[str]:
        """Wait until exactly ``n`` instances are ready (none of ``exclude``); their ids."""

        def check() -> set[str]:
            ready = ready_ids(self.output())
            return ready if len(ready) == n and not ready & exclude else set()

        try:
            return wait_until(check, timeout, interval=0.02, message=f"{n} ready instances")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- portico output ---\n{self.output()}") from None

    def descendants(self) -> list[psutil.Process]:
        """Every process Portico started that is still alive."""
        self.sample()
        with self._lock:
            procs = list(self.seen.values())
        return [p for p in procs if _alive(p)]

    def stop(self, sig: int = signal.SIGTERM) -> list[str]:
        """Stop Portico; return every process it started that outlived it by GONE_WITHIN
        (and kill those, so that nothing outlives the test either)."""
        self.sample()
        self.process.stop(sig, timeout=15.0)
        self._watching.clear()
        self._watcher.join(5)
        return self.leftovers()

    def leftovers(self) -> list[str]:
        with self._lock:
            procs = list(self.seen.values())
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not any(_alive(p) for p in procs), GONE_WITHIN, interval=0.02)
        left = []
        for p in procs:
            if _alive(p):
                with contextlib.suppress(psutil.Error):
                    left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
                with contextlib.suppress(psutil.Error):
                    p.kill()
        return left


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _serve(config: dict[str, Any]) -> Fleet:
    portico = PorticoProcess(config)  # writes the config file, picks a free listen port
    return Fleet(portico.process, portico.port)


def _run(*args: str, cwd: str | None = None) -> Fleet:
    port = free_port()
    argv = [sys.executable, "-m", "portico", "run", "--listen", f"127.0.0.1:{port}", *args]
    return Fleet(ManagedProcess(argv, cwd=cwd, name="portico-run"), port)


FleetFactory = Callable[..., Fleet]


def _finish(fleets: list[Fleet], failed: bool) -> None:
    problems = []
    for fleet in reversed(fleets):
        left = fleet.stop()
        if left:
            problems.append(f"processes left behind by portico {fleet.pid}: {left}")
        if failed or left:
            print(f"--- portico {fleet.pid} output ---\n{fleet.output()}")
    assert not problems, "\n".join(problems)


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> Iterator[FleetFactory]:
    """Factory: ``fleet(config_dict)`` runs ``portico serve -c``; ``fleet(run=[args...],
    cwd=...)`` runs ``portico run ARGS``. Stopped at teardown, which fails if any process
    Portico started outlives it."""
    fleets: list[Fleet] = []

    def start(config: dict[str, Any] | None = None, *, run: list[str] | None = None,
              cwd: str | None = None) -> Fleet:  # fmt: skip
        f = _serve(config) if config is not None else _run(*(run or []), cwd=cwd)
        fleets.append(f)
        return f.start()

    yield start
    _finish(fleets, getattr(getattr(request.node, "rep_call", None), "failed", False))


# --- small apps with controlled timing --------------------------------------------------------

# Readiness that fails for a while: an instance whose id ends with $SLOW_SUFFIX answers 503 on
# /ready for its first $FAIL_PROBES probes; every other path reports whether /ready has passed.
READY_APP = """\
import json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTANCE = os.environ["PORTICO_INSTANCE"]
SLOW = INSTANCE.endswith(os.environ["SLOW_SUFFIX"])
FAIL = int(os.environ["FAIL_PROBES"]) if SLOW else 0
state = {"probes": 0, "passed": False}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/ready":
            with lock:
                state["probes"] += 1
                ok = state["probes"] > FAIL
                state["passed"] = state["passed"] or ok
                n = state["probes"]
            status, body = (200 if ok else 503), b""
            print(f"probe {n}: {status}", flush=True)
        else:
            with lock:
                body = json.dumps({"instance": INSTANCE, "pid": os.getpid(), **state}).encode()
            status = 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

ASGI_APP = """\
import json
import os


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps(
        {"instance": os.environ["PORTICO_INSTANCE"], "pid": os.getpid(), "asgi": True}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
"""


def whoami_pids(port: int, n: int = 8) -> dict[int, str]:
    """worker PID -> instance id, from ``n`` sequential /whoami requests."""
    seen = {}
    for _ in range(n):
        reply = get(port)
        assert reply.status == 200, reply
        data = reply.json()
        seen[data["pid"]] = data["instance"]
    return seen


def leader_of(worker_pid: int) -> int:
    """The gunicorn master (the process Portico started) of a worker."""
    return psutil.Process(worker_pid).ppid()


def wait_gone(pids: list[int], timeout: float = GONE_WITHIN) -> None:
    wait_until(
        lambda: all(process_gone(p) for p in pids),
        timeout,
        message=f"processes {pids} to be gone: still {[p for p in pids if not process_gone(p)]}",
    )


# --- a shared fleet of two Flask instances ----------------------------------------------------


@pytest.fixture(scope="module")
def flask_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two gunicorn+Flask instances behind one Portico, with a pid file for `portico restart
    -c`. Tests may kill or restart instances but leave two ready ones behind."""
    pid_file = tmp_path_factory.mktemp("flask-fleet") / "portico.pid"
    config = app_config({**FLASK, "min": 2, "max": 2})
    config["server"]["pid_file"] = str(pid_file)
    f = _serve(config).start()
    ok = False
    try:
        f.wait_ready(2)
        ok = True
        yield f
    finally:
        _finish([f], failed=not ok)


def test_instances_start_become_ready_and_take_traffic(flask_fleet: Fleet) -> None:
    ready = flask_fleet.wait_ready(2)
    served = whoami_pids(flask_fleet.port)
    assert len(served) == 2, f"round robin over two instances, got {served}"
    assert set(served.values()) == ready
    leaders = {leader_of(pid) for pid in served}
    children = {p.pid for p in psutil.Process(flask_fleet.pid).children()}
    assert leaders <= children, "each instance is a process Portico started"
    # Each was probed on its own port before it took traffic.
    started = lines_matching(flask_fleet.output(), r"\] (default-\d+) started on 127\.0\.0\.1:\d+")
    assert {m.group(1) for m in started} >= ready


def test_instance_output_goes_to_the_log_with_its_id_as_prefix(flask_fleet: Fleet) -> None:
    served = whoami_pids(flask_fleet.port)
    for pid, instance in served.items():
        flask_fleet.wait_log(rf"\[{re.escape(instance)}\] .*Booting worker with pid: {pid}$")


def test_killed_instance_is_replaced_and_no_request_fails(flask_fleet: Fleet) -> None:
    before = flask_fleet.wait_ready(2)
    served = whoami_pids(flask_fleet.port)
    worker, victim = next(iter(served.items()))
    leader = leader_of(worker)
    with Stream(flask_fleet.port, threads=4, max_requests=50_000) as stream:
        stream.wait_for(20)
        os.kill(leader, signal.SIGKILL)
        flask_fleet.wait_log(rf"\] {victim} exited with -9 while ready; restart in ")
        after = flask_fleet.wait_ready(2, exclude={victim})
        (fresh,) = after - before
        healed_at = time.time()
        stream.wait_for(40)
    assert stream.failures() == []
    assert fresh in {r.json()["instance"] for r in stream.since(healed_at)}
    # The whole crashed instance is gone, its gunicorn worker included (it must not keep
    # serving on a port Portico forgot).
    wait_gone([leader, worker])


def test_crashed_instance_leaves_no_child_process_behind(fleet: FleetFactory) -> None:
    # The instance is a shell whose child serves; SIGKILL to the shell orphans the server,
    # which would keep its port and run forever unless the supervisor ends the whole group.
    serve = f"{sys.executable} -m http.server --bind 127.0.0.1 {{port}} & wait"
    f = fleet(app_config({"command": ["sh", "-c", serve], "min": 1, "max": 1}))
    f.wait_ready(1)
    (server,) = [
        p for p in f.descendants() if p.cmdline()[:3] == [sys.executable, "-m", "http.server"]
    ]
    shell = server.ppid()
    os.kill(shell, signal.SIGKILL)
    f.wait_log(r"\] default-1 exited with -9 while ready; restart in ")
    f.wait_ready(1, exclude={"default-1"})
    assert get(f.port, "/").status == 200
    wait_gone([shell, server.pid])


@pytest.mark.parametrize("how", ["restart --pid", "restart -c", "SIGUSR1"])
def test_rolling_restart_replaces_every_instance_and_loses_no_request(
    flask_fleet: Fleet, how: str
) -> None:
    before = flask_fleet.wait_ready(2)
    old_workers = set(whoami_pids(flask_fleet.port))
    old_leaders = {leader_of(pid) for pid in old_workers}
    with Stream(flask_fleet.port, threads=4, max_requests=50_000) as stream:
        stream.wait_for(20)
        if how == "SIGUSR1":
            os.kill(flask_fleet.pid, signal.SIGUSR1)
        else:
            flag = ["--pid", str(flask_fleet.pid)] if how == "restart --pid" else []
            if how == "restart -c":
                config = Path(flask_fleet.process.argv[-1])
                flag = ["-c", str(config)]
            done = subprocess.run(
                [sys.executable, "-m", "portico", "restart", *flag],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert done.returncode == 0, done.stderr
            assert f"rolling restart requested from process {flask_fleet.pid}" in done.stdout
        flask_fleet.wait_log(r"rolling restart of default: 2 instance\(s\)")
        for old in before:
            flask_fleet.wait_log(rf"\] {old} stopped \(rolling restart\)$")
        after = flask_fleet.wait_ready(2, exclude=before)
        restarted_at = time.time()
        stream.wait_for(20)
    assert stream.failures() == []
    new_workers = {r.json()["pid"] for r in stream.since(restarted_at)}
    assert new_workers and not new_workers & old_workers
    assert {r.json()["instance"] for r in stream.since(restarted_at)} == after
    wait_gone(sorted(old_workers | old_leaders))


# --- readiness gate -----------------------------------------------------------------------------


def test_instance_gets_no_traffic_until_its_ready_path_passes(
    fleet: FleetFactory, tmp_path: Path
) -> None:
    script = tmp_path / "ready_app.py"
    script.write_text(READY_APP)
    fail_probes = 20  # x ready_interval 0.05 s: about a second of 503s
    f = fleet(
        app_config(
            {
                "command": [sys.executable, str(script), "{port}"],
                "min": 2,
                "max": 2,
                "ready_path": "/ready",
                "env": {"SLOW_SUFFIX": "-2", "FAIL_PROBES": str(fail_probes)},
            }
        )
    )
    with Stream(f.port, target="/state", threads=3, max_requests=3000) as stream:
        f.wait_ready(2)
        stream.wait_for(30)
    assert stream.failures() == []
    replies = sorted(stream.replies, key=lambda r: r.ended)
    states = [r.json() for r in replies]
    assert all(s["passed"] for s in states), "an instance got a request before it was ready"
    slow = [s for s in states if s["instance"] == "default-2"]
    assert slow, "the slow instance took traffic once ready"
    assert slow[0]["probes"] > fail_probes
    first_slow = next(i for i, s in enumerate(states) if s["instance"] == "default-2")
    assert first_slow >= 10, "default-1 served alone while default-2 was not ready"
    out = f.output()
    assert f"[default-2] probe {fail_probes}: 503" in out
    assert f"[default-2] probe {fail_probes + 1}: 200" in out


# --- scale-down drains ----------------------------------------------------------------------


def test_scale_down_drains_in_flight_requests_before_stopping(fleet: FleetFactory) -> None:
    f = fleet(
        app_config(
            {
                **FLASK,
                "min": 1,
                "max": 3,
                "autoscale": {
                    "metric": "in_flight",
                    "target": 2,
                    "interval": 0.2,
                    "scale_up_window": 0,
                    "scale_down_window": 0.6,
                    "max_step": 4,
                    "cooldown": 0,
                    "idle_timeout": 60,
                },
            },
            balancer="least_connections",
        )
    )
    f.wait_ready(1)
    # Load enough to need three instances (8 in flight, target 2 each).
    with Stream(f.port, target="/sleep/0.2", threads=8, max_requests=400) as load:
        three = f.wait_ready(3)
        load.wait_for(8)
    assert load.failures() == []
    # One slow request per instance (least_connections): 1 in flight each, half the target, so the
    # fleet scales down while every instance still has a request in flight.
    slow = get_many(f.port, ["/sleep/1.5"] * 3)
    assert all(isinstance(r, Reply) and r.status == 200 for r in slow), slow
    replies = [r for r in slow if isinstance(r, Reply)]
    assert {r.json()["instance"] for r in replies} == three
    # 3 -> 2 as a rule; 3 -> 1 if the pause between the two loads filled the window.
    scaled = f.wait_log(r"scale default 3 -> [12]: in-flight/instance \S+ < target 2")
    stopped = f.wait_log(r"\] (default-\d+) stopped \(scale down\)$")
    decided_at = log_time(scaled[0].string)
    victim = stopped[0].group(1)
    (its_reply,) = [r for r in replies if r.json()["instance"] == victim]
    assert decided_at < its_reply.ended, "the scale-down came while the request was in flight"
    assert log_time(stopped[0].string) >= its_reply.ended - 0.1, "stopped only after it finished"


# --- autoscaler -----------------------------------------------------------------------------


def test_autoscaler_scales_up_under_load_and_back_down_after(fleet: FleetFactory) -> None:
    f = fleet(
        app_config(
            {
                **FLASK,
                "min": 1,
                "max": 3,
                "autoscale": {
                    "metric": "in_flight",
                    "target": 1,
                    "interval": 0.2,
                    "scale_up_window": 0.2,
                    "scale_down_window": 0.4,
                    "max_step": 4,
                    "cooldown": 0,
                    "idle_timeout": 60,
                },
            }
        )
    )
    f.wait_ready(1)
    with Stream(f.port, target="/sleep/0.3", threads=6, max_requests=300, max_seconds=15) as load:
        t0 = time.time()
        up = f.wait_log(r"scale default 1 -> (\d+): in-flight/instance (\S+) > target 1$")
        f.wait_ready(3)
        load.wait_for(6)
    assert load.failures() == []
    decision = up[0]
    # Within the scale-up window plus a few sampling intervals, not seconds later.
    assert log_time(decision.string) - t0 < 2.0
    assert int(decision.group(1)) >= 2 and float(decision.group(2)) > 1
    stopped_load = time.time()
    down = f.wait_log(r"scale default \d -> 1: in-flight/instance (\S+) < target 1$")
    assert log_time(down[0].string) >= stopped_load
    assert float(down[0].group(1)) < 1
    f.wait_ready(1)
    assert len(lines_matching(f.output(), r"\] default-\d+ stopped \(scale down\)$")) == 2
    assert get(f.port).status == 200


# --- crash loop ---------------------------------------------------------------------------------


def test_crash_looping_command_backs_off_and_is_reported(fleet: FleetFactory) -> None:
    crash = "print('booting and failing', flush=True); import sys; sys.exit(3)"
    f = fleet(
        app_config(
            {
                "command": [sys.executable, "-c", crash],
                "min": 1,
                "max": 1,
                "backoff_initial": 0.1,
                "backoff_max": 0.8,
                "crash_loop_after": 4,
            }
        )
    )
    f.wait_log(r"default is crash-looping: 4 crashes in a row, last: .*; retrying every 0\.8s$")
    restarts = f.wait_log(r"\] default-\d+ exited with 3 while starting; restart in (\S+)s$", 5)
    delays = [float(m.group(1)) for m in restarts]
    assert delays[:5] == [0.1, 0.2, 0.4, 0.8, 0.8]
    starts = [log_time(m.string) for m in lines_matching(f.output(), r"\] default-\d+ started on")]
    gaps = [b - a for a, b in itertools.pairwise(starts[:5])]
    for gap, delay in zip(gaps, delays, strict=False):
        assert gap >= delay - 0.01, f"restarted after {gap:.3f}s, before its {delay}s back-off"
    assert gaps[3] > gaps[0], f"back-off grows: {gaps}"
    assert "[default-1] booting and failing" in f.output()
    assert get(f.port).status == 503


# --- scale from and to zero ---------------------------------------------------------------------


def test_min_zero_cold_starts_on_first_request_and_scales_back_to_zero(
    fleet: FleetFactory,
) -> None:
    idle_timeout = 1.0
    f = fleet(
        app_config(
            {
                **FLASK,
                "min": 0,
                "max": 2,
                "cold_start_timeout": 5.0,
                "autoscale": {
                    "target": 4,
                    "interval": 0.2,
                    "scale_down_window": 0,
                    "cooldown": 0,
                    "idle_timeout": idle_timeout,
                },
            }
        )
    )
    assert f.descendants() == [], "min = 0 starts nothing before a request"
    first = get(f.port)
    assert first.status == 200, first
    took = first.ended - first.started
    assert took > 0.1, f"answered in {took:.3f}s: it waited for an instance to start"
    assert "scale default 0 -> 1: cold start on the first request" in f.output()
    worker = first.json()["pid"]
    leader = leader_of(worker)
    zero = f.wait_log(r"scale default 1 -> 0: (.*)$")
    assert zero[0].group(1).startswith("idle for"), zero[0].string
    assert log_time(zero[0].string) - first.ended >= idle_timeout - 0.05
    wait_gone([worker, leader])
    # Idle for longer than idle_timeout by now: the next cold start must not count as idle.
    second = get(f.port)
    assert second.status == 200, f"cold start after an idle spell: {second}"
    assert second.json()["pid"] != worker


@pytest.mark.parametrize(
    ("command", "within"),
    [
        pytest.param([sys.executable, "-c", "import sys; sys.exit(1)"], 3.0, id="exits"),
        pytest.param([sys.executable, "-c", "import time; time.sleep(60)"], 3.0, id="never-ready"),
    ],
)
def test_failed_cold_start_answers_503_within_cold_start_timeout(
    fleet: FleetFactory, command: list[str], within: float
) -> None:
    cold_start_timeout = 1.0
    f = fleet(
        app_config(
            {
                "command": command,
                "min": 0,
                "max": 1,
                "cold_start_timeout": cold_start_timeout,
                "backoff_initial": 0.5,
                "autoscale": {"interval": 0.2, "idle_timeout": 60},
            }
        )
    )
    reply = get(f.port, "/")
    took = reply.ended - reply.started
    assert reply.status == 503, reply
    assert reply.body == b"503 Service Unavailable\n"
    assert took <= cold_start_timeout + 0.5, f"503 after {took:.2f}s"


# --- Portico's own death ------------------------------------------------------------------------


def test_sigkill_of_portico_leaves_no_instance_process_behind(fleet: FleetFactory) -> None:
    f = fleet(run=["--wsgi", "app:app", "--cwd", str(FLASK_APP_DIR), "--min", "2"])
    f.wait_ready(2)
    workers = set(whoami_pids(f.port))
    assert len(workers) == 2
    instances = f.descendants()
    leaders = {leader_of(w) for w in workers}
    assert leaders | workers <= {p.pid for p in instances}
    os.kill(f.pid, signal.SIGKILL)
    left = f.leftovers()
    assert left == [], f"still running {GONE_WITHIN}s after portico was SIGKILLed: {left}"


def test_sigterm_lets_in_flight_requests_finish_then_stops_every_instance(
    fleet: FleetFactory,
) -> None:
    f = fleet(app_config({**FLASK, "min": 2, "max": 2}))
    f.wait_ready(2)
    workers = list(whoami_pids(f.port))
    instances = f.descendants()
    replies: list[Reply | BaseException] = []
    client = threading.Thread(target=lambda: replies.extend(get_many(f.port, ["/sleep/1.0"])))
    client.start()
    try:
        wait_until(lambda: any(handling_a_request(w) for w in workers), 5, message="in flight")
        f.process.signal(signal.SIGTERM)
    finally:
        client.join(30)
    (reply,) = replies
    assert isinstance(reply, Reply) and reply.status == 200, reply
    assert f.process.wait(15) == 0
    stops = lines_matching(f.output(), r"\] default-\d stopped \(shutdown\)$")
    assert len(stops) == 2
    assert min(log_time(m.string) for m in stops) >= reply.ended - 0.1, "stopped after the client"
    wait_gone([p.pid for p in instances])


def handling_a_request(worker: int) -> bool:
    """A gunicorn sync worker holds a connection open only while it serves a request."""
    try:
        conns = psutil.Process(worker).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_ESTABLISHED for c in conns)


# --- `portico run` end to end -------------------------------------------------------------------


def test_portico_run_wsgi_end_to_end(fleet: FleetFactory) -> None:
    f = fleet(run=["--wsgi", "app:app", "--cwd", "examples/flask-app", "--min", "2"],
              cwd=str(FLASK_APP_DIR.parents[1]))  # fmt: skip
    f.wait_ready(2)
    served = whoami_pids(f.port)
    assert sorted(served.values()) == ["default-1", "default-2"]
    page = get(f.port, "/")
    assert page.status == 200 and b"Answered by default-" in page.body
    instances = f.descendants()
    assert f.stop() == []
    for p in instances:
        assert not _alive(p)


def test_portico_run_asgi_under_uvicorn(fleet: FleetFactory, tmp_path: Path) -> None:
    (tmp_path / "tinyasgi.py").write_text(ASGI_APP)
    f = fleet(run=["--asgi", "tinyasgi:app", "--cwd", str(tmp_path), "--min", "2"])
    f.wait_ready(2)
    seen = {}
    for _ in range(6):
        reply = get(f.port, "/")
        assert reply.status == 200, reply
        data = reply.json()
        assert data["asgi"] is True
        seen[data["pid"]] = data["instance"]
    assert sorted(seen.values()) == ["default-1", "default-2"]
    f.wait_log(r"\[default-1\] .*Uvicorn running on http://127\.0\.0\.1:\d+")


# --- several data-plane workers ---------------------------------------------------------------
# The master runs the supervisors once and publishes endpoints to the workers (control.bus);
# the workers report their in-flight counts back, which draining and autoscaling read.


def worker_pids(f: Fleet) -> set[int]:
    return set(listening_workers(f.pid, f.port))


def test_apps_with_two_workers_heal_and_roll_without_losing_a_request(
    fleet: FleetFactory,
) -> None:
    config = app_config({**FLASK, "min": 2, "max": 2})
    config["server"]["workers"] = 2
    f = fleet(config)
    before = f.wait_ready(2)
    wait_until(lambda: len(worker_pids(f)) == 2, SOON, message="two data-plane workers")
    served = whoami_pids(f.port)
    assert set(served.values()) == before
    worker, victim = next(iter(served.items()))
    # Two workers answer fast: leave the stream room for the whole kill-and-roll sequence.
    with Stream(f.port, threads=4, max_requests=50_000, max_seconds=30) as stream:
        stream.wait_for(20)
        os.kill(leader_of(worker), signal.SIGKILL)
        f.wait_log(rf"\] {victim} exited with -9 while ready; restart in ")
        healed = f.wait_ready(2, exclude={victim})
        stream.wait_for(20)
        os.kill(f.pid, signal.SIGUSR1)
        f.wait_log(r"rolling restart of default: 2 instance\(s\)")
        for old in healed:
            f.wait_log(rf"\] {old} stopped \(rolling restart\)$")
        after = f.wait_ready(2, exclude=healed)
        rolled_at = time.time()
        stream.wait_for(20)
    assert stream.failures() == []
    assert {r.json()["instance"] for r in stream.since(rolled_at)} == after


def test_two_workers_cold_start_and_scale_on_their_summed_load(fleet: FleetFactory) -> None:
    config = app_config(
        {
            **FLASK,
            "min": 0,
            "max": 3,
            "autoscale": {
                "metric": "in_flight",
                "target": 1,
                "interval": 0.2,
                "scale_down_window": 0.4,
                "cooldown": 0,
                "idle_timeout": 60,
            },
        }
    )
    config["server"]["workers"] = 2
    f = fleet(config)
    wait_until(lambda: len(worker_pids(f)) == 2, SOON, message="two data-plane workers")
    # A worker has no instance to offer: it asks the master, which starts one.
    first = get(f.port)
    assert first.status == 200, first
    assert "scale default 0 -> 1: cold start on the first request" in f.output()
    # Slow requests spread over both workers; only their sum exceeds the target per instance.
    with Stream(f.port, target="/sleep/0.3", threads=6, max_requests=300, max_seconds=15) as load:
        up = f.wait_log(r"scale default 1 -> (\d+): in-flight/instance (\S+) > target 1$")
        load.wait_for(6)
    assert load.failures() == []
    assert int(up[0].group(1)) >= 2
