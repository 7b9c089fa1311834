"""Stopping is prompt and says what it waits for: the first SIGINT/SIGTERM drains (logging
what it waits for and for how long at most), a second one stops at once, with app instances
still stopped and none left behind; a request held for a cold start is answered 503 at once.

Real processes throughout: ``python -m portico serve``, a raw backend that never answers,
and app instances that never listen or ignore SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import psutil
import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import never_respond
from tests.support.processes import process_gone
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection
from tests.support.waiting import wait_until

GRACE = 30.0
# A stop that is "at once" finishes within this many seconds of the second signal.
PROMPT = 5.0

# An app that serves 200 on its port and ignores SIGTERM: only SIGKILL stops it.
STUBBORN_APP = """
import http.server, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_ctrl_c_to_the_process_group_with_workers_drains_then_stops_at_once(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    """A terminal's Ctrl-C reaches master and workers alike: the first one must still be a
    graceful stop (workers leave SIGINT to their master), the second an immediate one."""
    backend = raw_backend(never_respond())
    proxy = portico(
        {"server": {"shutdown_grace": GRACE}, "upstreams": {"a": {"backends": [backend.url]}}},
        workers=2,
    )
    with RawConnection(proxy.port, timeout=10) as conn:
        conn.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        backend.wait_for_connections(1, timeout=10)
        os.killpg(proxy.pid, signal.SIGINT)
        wait_until(lambda: "stopping gracefully" in proxy.output(), 10, message="first stop")
        time.sleep(1.0)
        assert proxy.process.alive(), "the first Ctrl-C must drain, not stop at once"
        assert "stopping at once" not in proxy.output()
        os.killpg(proxy.pid, signal.SIGINT)
        code, took = exit_within(proxy, PROMPT)
    assert code == 0 and took < PROMPT


def exit_within(proxy: PorticoProcess, seconds: float) -> tuple[int, float]:
    t0 = time.monotonic()
    code = proxy.process.wait(seconds)
    return code, time.monotonic() - t0


def app_config(command: list[str], **app: Any) -> dict[str, Any]:
    return {
        "server": {"shutdown_grace": GRACE},
        "upstreams": {"app": {"app": {"command": command, **app}}},
    }


def instance_pids(proxy: PorticoProcess) -> list[int]:
    """App instances: Portico's children that are not its guard shells."""
    children = psutil.Process(proxy.pid).children()
    return [c.pid for c in children if "portico-guard" not in " ".join(c.cmdline())]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_stops_at_once_with_a_request_in_flight(
    sig: int, raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backend = raw_backend(never_respond())
    proxy = portico(
        {"server": {"shutdown_grace": GRACE}, "upstreams": {"a": {"backends": [backend.url]}}}
    )
    with RawConnection(proxy.port, timeout=10) as conn:
        conn.send(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
        backend.wait_for_connections(1, timeout=10)
        proxy.process.signal(sig)
        wait_until(
            lambda: "stopping gracefully" in proxy.output(), 10, message="the first-stop line"
        )
        line = next(x for x in proxy.output().splitlines() if "stopping gracefully" in x)
        assert f"waiting up to {GRACE:g}s for 1 open connection(s)" in line
        assert "again to stop at once" in line
        time.sleep(1.0)
        assert proxy.process.alive(), "the first signal must drain, not stop at once"
        proxy.process.signal(sig)
        code, took = exit_within(proxy, PROMPT)
    assert code == 0
    assert took < PROMPT
    assert "again: stopping at once" in proxy.output()


def test_a_request_held_for_a_cold_start_gets_503_at_once_on_stop(
    portico: PorticoFactory,
) -> None:
    # Scale from zero to an app that never listens: the first request is held for it.
    never_listens = [sys.executable, "-c", "import time; time.sleep(300)"]
    proxy = portico(
        app_config(never_listens, min=0, max=1, ready_timeout=120, cold_start_timeout=120)
    )
    with RawConnection(proxy.port, timeout=10) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        wait_until(lambda: instance_pids(proxy), 15, message="the cold start to begin")
        started = instance_pids(proxy)
        t0 = time.monotonic()
        proxy.process.signal(signal.SIGTERM)
        response = conn.recv_response(timeout=PROMPT)
        answered = time.monotonic() - t0
    assert response.status == 503
    assert answered < 2.0, f"the held request was answered after {answered:.1f}s"
    code, _ = exit_within(proxy, PROMPT + 10)
    assert code == 0
    for pid in started:
        wait_until(lambda pid=pid: process_gone(pid), 5, message=f"instance {pid} gone")


def test_second_signal_kills_instances_that_ignore_sigterm(portico: PorticoFactory) -> None:
    command = [sys.executable, "-c", STUBBORN_APP, "{port}"]
    proxy = portico(app_config(command, min=1, max=1, stop_timeout=120, drain_timeout=1))
    wait_until(lambda: "ready: taking traffic" in proxy.output(), 30, message="the instance ready")
    pids = instance_pids(proxy)
    assert pids
    proxy.process.signal(signal.SIGINT)
    wait_until(lambda: "stopping app instances" in proxy.output(), 10, message="apps stopping")
    time.sleep(2.0)
    assert proxy.process.alive(), "the instance ignores SIGTERM: a graceful stop waits"
    proxy.process.signal(signal.SIGINT)
    code, took = exit_within(proxy, PROMPT)
    assert code == 0 and took < PROMPT
    for pid in pids:
        wait_until(lambda pid=pid: process_gone(pid), 5, message=f"instance {pid} gone")


def test_a_client_that_leaves_releases_its_cold_start_hold(portico: PorticoFactory) -> None:
    # Nothing has been sent upstream while a request is held, so a client that half-closes
    # or resets has given up: the hold ends at once (no answer, the connection closes), and
    # a later stop finds no held request to answer.
    never_listens = [sys.executable, "-c", "import time; time.sleep(300)"]
    proxy = portico(
        app_config(never_listens, min=0, max=1, ready_timeout=120, cold_start_timeout=120)
    )
    with RawConnection(proxy.port, timeout=10) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        wait_until(lambda: instance_pids(proxy), 15, message="the cold start to begin")
        conn.shutdown_write()
        assert conn.closed(timeout=3.0), "the held request outlived its client"
        assert conn.pending == b""
    with RawConnection(proxy.port, timeout=10) as gone:
        gone.send(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(0.3)
    proxy.process.signal(signal.SIGTERM)
    code, _ = exit_within(proxy, PROMPT + 10)
    assert code == 0
    assert "held for a cold start" not in proxy.output(), proxy.output()
