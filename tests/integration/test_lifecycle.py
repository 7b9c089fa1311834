"""The life of a Portico process: graceful stop, reload, workers, one-line mode.

Every check is made from outside, the way an operator would see it: signals sent to the real
process, connections refused or answered on real sockets, worker processes found and watched
by PID with psutil. ``portico check`` is covered by ``test_cli.py``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import GunicornFlask, RawBackend, never_respond, respond
from tests.support.behaviours import respond_when
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess, listening_workers, process_gone
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection, build_request
from tests.support.tomlwriter import dumps
from tests.support.waiting import wait_for_port, wait_until

# How soon after SIGTERM the listening socket must refuse connections.
STOP_ACCEPTING_WITHIN = 2.0


def answer(body: bytes) -> bytes:
    """A keep-alive 200 response with ``body``."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def config_for(*backends: str, **server: Any) -> dict[str, Any]:
    return {
        "server": {"timeouts": {"header": 5, "keepalive": 30}, **server},
        "upstreams": {
            "app": {
                "backends": list(backends),
                "timeouts": {"connect": 2, "response_header": 20, "body_idle": 10},
            }
        },
    }


def get(port: int, target: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET on a fresh connection: (status, body)."""
    with RawConnection(port, timeout=timeout) as conn:
        response = conn.request("GET", target)
        return response.status, response.body


def refuses_connections(port: int) -> bool:
    """True if a connection to ``port`` is refused now (not merely slow to be accepted)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def wait_exit(proc: ManagedProcess, timeout: float) -> tuple[int, float]:
    """Wait for ``proc`` to exit by itself: (exit code, seconds it took)."""
    t0 = time.monotonic()
    code = proc.wait(timeout)
    return code, time.monotonic() - t0


# --- graceful stop ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_refuses_new_connections_and_finishes_in_flight_requests(
    sig: signal.Signals, raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    gate = threading.Event()
    backend = raw_backend(respond_when(gate, answer(b"finished")))
    grace = 5.0
    proxy = portico(config_for(backend.url, shutdown_grace=grace))
    with contextlib.ExitStack() as stack:
        stack.callback(gate.set)  # never leave the backend holding a response
        idle = stack.enter_context(RawConnection(proxy.port))
        gate.set()
        assert idle.request("GET", "/first").status == 200  # now an idle keep-alive client
        gate.clear()

        busy = stack.enter_context(RawConnection(proxy.port, timeout=10))
        busy.send(build_request("GET", "/slow"))
        wait_until(
            lambda: b"GET /slow " in backend.all_received(), message="the backend to get /slow"
        )

        proxy.process.signal(sig)
        signalled_at = time.monotonic()
        wait_until(
            lambda: refuses_connections(proxy.port),
            STOP_ACCEPTING_WITHIN,
            message="Portico to refuse new connections",
        )
        assert idle.closed(timeout=2.0), "the idle keep-alive connection was not closed"
        assert idle.pending == b""
        assert proxy.process.alive(), "Portico exited with a request in flight"

        gate.set()  # the backend answers the request in flight
        response = busy.recv_response(timeout=grace)
        assert response.status == 200
        assert response.body == b"finished"
        assert response.header("connection") == "close"
        assert busy.closed(timeout=2.0)

    code = proxy.process.wait(grace)  # raises TimeoutExpired if it overstays its grace
    elapsed = time.monotonic() - signalled_at
    assert code == 0, proxy.output()
    assert elapsed < grace, f"exited {elapsed:.1f}s after the signal (grace {grace}s)"


def test_graceful_stop_lets_a_slow_flask_request_finish(
    flask_backends: list[GunicornFlask], portico: PorticoFactory
) -> None:
    backend = flask_backends[0]
    grace = 5.0
    proxy = portico(config_for(backend.url, shutdown_grace=grace))
    with RawConnection(proxy.port, timeout=10) as conn:
        conn.send(build_request("GET", "/sleep/1"))
        # The request is on its way once Portico holds a connection to gunicorn.
        wait_until(
            lambda: upstream_connections(proxy.pid, backend.port) > 0,
            message="Portico to connect to gunicorn",
        )
        proxy.process.signal(signal.SIGTERM)
        wait_until(
            lambda: refuses_connections(proxy.port),
            STOP_ACCEPTING_WITHIN,
            message="Portico to refuse new connections",
        )
        response = conn.recv_response(timeout=grace)
    assert response.status == 200
    assert response.json()["slept"] == 1.0
    assert response.json()["instance"] == "a"
    code, _ = wait_exit(proxy.process, grace)
    assert code == 0, proxy.output()


def test_requests_beyond_the_grace_period_are_cut_and_portico_exits(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backend = raw_backend(never_respond())
    grace = 1.0
    proxy = portico(config_for(backend.url, shutdown_grace=grace))
    with RawConnection(proxy.port, timeout=10) as conn:
        conn.send(build_request("GET", "/forever"))
        wait_until(lambda: b"GET /forever " in backend.all_received(), message="the request")
        proxy.process.signal(signal.SIGTERM)
        code, elapsed = wait_exit(proxy.process, grace + 5)
        assert code == 0, proxy.output()
        assert grace * 0.9 <= elapsed < grace + 3, f"exited {elapsed:.2f}s after SIGTERM"
        assert conn.closed(timeout=1.0), "the client connection outlived Portico"
        assert conn.pending == b"", "a cut request must not look answered"
    wait_until(lambda: backend.records[0].peer_closed, 2.0, message="upstream connection closed")


# --- reload -------------------------------------------------------------------------------------


def rewrite_config(proxy: PorticoProcess, change: Callable[[dict[str, Any]], None]) -> None:
    """Write a changed copy of the running config to Portico's config file."""
    data = copy.deepcopy(proxy.config)
    change(data)
    proxy.config_path.write_text(dumps(data))


def use_backend(url: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["upstreams"]["app"]["backends"] = [url]

    return change


@pytest.fixture
def two_backends(raw_backend: RawBackendFactory) -> tuple[RawBackend, RawBackend]:
    return raw_backend(respond(answer(b"A"))), raw_backend(respond(answer(b"B")))


def test_sighup_reload_sends_next_requests_to_the_new_backends(
    two_backends: tuple[RawBackend, RawBackend], portico: PorticoFactory
) -> None:
    a, b = two_backends
    proxy = portico(config_for(a.url))
    with RawConnection(proxy.port) as kept:  # a keep-alive client that spans the reload
        assert kept.request("GET", "/").body == b"A"
        assert get(proxy.port) == (200, b"A")

        rewrite_config(proxy, use_backend(b.url))
        proxy.process.signal(signal.SIGHUP)
        wait_until(lambda: get(proxy.port) == (200, b"B"), message="requests to reach B")
        assert [get(proxy.port)[1] for _ in range(10)] == [b"B"] * 10
        assert kept.request("GET", "/").body == b"B"
    assert proxy.process.alive()
    assert "reloaded" in proxy.output()
    served_by_a = a.connections
    assert get(proxy.port) == (200, b"B")
    assert a.connections == served_by_a


def test_sighup_with_a_broken_config_keeps_the_old_one(
    two_backends: tuple[RawBackend, RawBackend], portico: PorticoFactory
) -> None:
    a, b = two_backends
    proxy = portico(config_for(a.url))
    assert get(proxy.port) == (200, b"A")

    def break_it(data: dict[str, Any]) -> None:
        data["upstreams"]["app"]["backends"] = [b.url, "127.0.0.1:1"]
        data["server"]["wrkers"] = 2

    rewrite_config(proxy, break_it)
    proxy.process.signal(signal.SIGHUP)
    expected = [
        "upstreams.app.backends[1]: not a URL (expected http://host:port)",
        "server.wrkers: unknown key (did you mean 'workers'?)",
    ]
    wait_until(
        lambda: all(line in proxy.output() for line in expected),
        message="the refused reload's problems in the log",
    )
    refused = [line for line in proxy.output().splitlines() if "reload refused" in line]
    assert len(refused) == len(expected), refused
    assert [get(proxy.port)[1] for _ in range(5)] == [b"A"] * 5
    assert b.connections == 0
    assert proxy.process.alive()

    # The refusal left Portico able to reload: a good file is taken as before.
    rewrite_config(proxy, use_backend(b.url))
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: get(proxy.port) == (200, b"B"), message="requests to reach B")


# --- workers ------------------------------------------------------------------------------------


def wait_for_workers(proxy: PorticoProcess, gone: int | None = None) -> list[int]:
    """Wait until two workers listen, neither of them ``gone``; return their PIDs."""
    found: list[int] = []

    def ready() -> bool:
        found[:] = listening_workers(proxy.pid, proxy.port)
        return len(found) == 2 and gone not in found

    wait_until(ready, 10, message=f"two workers listening (not {gone})")
    return found


def upstream_connections(pid: int, backend_port: int) -> int:
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == backend_port
    )


def workers_serving(workers: list[int], port: int, n: int = 40) -> dict[int, int]:
    """Make ``n`` requests on ``n`` simultaneously open connections and return, per worker
    PID, how many of the answered connections it holds (the kernel spreads connections over
    the workers' SO_REUSEPORT sockets)."""
    conns = [RawConnection(port) for _ in range(n)]
    try:
        for conn in conns:
            assert conn.request("GET", "/").status == 200
        ours = {conn.sock.getsockname()[1] for conn in conns}
        counts = {}
        for pid in workers:
            held = psutil.Process(pid).net_connections(kind="tcp")
            counts[pid] = sum(
                1 for c in held if c.laddr.port == port and c.raddr and c.raddr.port in ours
            )
        assert sum(counts.values()) == n, f"connections not all held by {workers}: {counts}"
        return counts
    finally:
        for conn in conns:
            conn.close()


@pytest.fixture
def two_workers(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> Iterator[tuple[PorticoProcess, list[int]]]:
    backend = raw_backend(respond())
    config = config_for(backend.url, listen=[f"127.0.0.1:{free_port()}"], shutdown_grace=3)
    proxy = portico(config, workers=2)
    workers = wait_for_workers(proxy)
    yield proxy, workers


def test_two_workers_both_serve_and_a_killed_one_is_replaced(
    two_workers: tuple[PorticoProcess, list[int]],
) -> None:
    proxy, workers = two_workers
    counts = workers_serving(workers, proxy.port)
    print(f"\nconnections served per worker: {counts}")
    assert all(counts.values()), f"a worker served nothing: {counts}"

    victim, survivor = workers
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for_workers(proxy, gone=victim)
    assert survivor in replaced
    counts = workers_serving(replaced, proxy.port)
    assert all(counts.values()), f"a worker served nothing after the replacement: {counts}"

    # SIGTERM to the master stops every worker, and the master exits 0.
    proxy.process.signal(signal.SIGTERM)
    code, _ = wait_exit(proxy.process, proxy.shutdown_grace + 5)
    assert code == 0, proxy.output()
    assert all(process_gone(pid) for pid in replaced), "a worker outlived its master"


def test_sigkill_to_the_master_leaves_no_worker_behind(
    two_workers: tuple[PorticoProcess, list[int]],
) -> None:
    proxy, workers = two_workers
    group = proxy.process.group_pids()
    assert set(workers) <= set(group)
    os.kill(proxy.pid, signal.SIGKILL)
    wait_until(
        lambda: all(process_gone(pid) for pid in workers),
        5,
        message=f"workers {workers} to die with their master",
    )
    # Nothing else the master started (e.g. multiprocessing's helper) is left either.
    wait_until(lambda: not proxy.process.group_pids(), 5, message="the process group to empty")
    assert refuses_connections(proxy.port)


def test_reload_reaches_every_worker_and_outlives_a_worker_restart(
    two_backends: tuple[RawBackend, RawBackend], portico: PorticoFactory
) -> None:
    a, b = two_backends
    config = config_for(a.url, listen=[f"127.0.0.1:{free_port()}"], shutdown_grace=3)
    proxy = portico(config, workers=2)
    workers = wait_for_workers(proxy)
    rewrite_config(proxy, use_backend(b.url))
    proxy.process.signal(signal.SIGHUP)
    # Fresh connections land on both workers (see workers_serving): all must have reloaded.
    wait_until(
        lambda: all(get(proxy.port)[1] == b"B" for _ in range(20)),
        message="every worker to send requests to B",
    )

    # A worker started after the reload must serve the reloaded config, not the first one.
    os.kill(workers[0], signal.SIGKILL)
    replaced = wait_for_workers(proxy, gone=workers[0])
    assert all(workers_serving(replaced, proxy.port).values())
    answers = [get(proxy.port)[1] for _ in range(40)]
    assert answers == [b"B"] * 40, f"{answers.count(b'A')} of 40 requests went to the old backend"


# --- one-line mode --------------------------------------------------------------------------------


@pytest.fixture
def portico_command() -> Iterator[Callable[..., ManagedProcess]]:
    """Factory: ``portico_command(*args)`` runs ``python -m portico ARGS`` as a ManagedProcess,
    stopped at teardown."""
    started: list[ManagedProcess] = []

    def start(*args: str) -> ManagedProcess:
        proc = ManagedProcess([sys.executable, "-m", "portico", *args], name="portico-cli")
        started.append(proc)
        return proc.start()

    yield start
    for proc in reversed(started):
        proc.stop(timeout=10)


def test_proxy_one_line_mode_balances_over_flask_backends(
    flask_backends: list[GunicornFlask], portico_command: Callable[..., ManagedProcess]
) -> None:
    a, b, _ = flask_backends
    port = free_port()
    proc = portico_command(
        "proxy", "--listen", f"127.0.0.1:{port}", "--backend", a.url, "--backend", b.url
    )
    try:
        wait_for_port(port, timeout=15)
    except AssertionError:
        raise AssertionError(f"portico proxy did not listen:\n{proc.output()}") from None

    instances = []
    with RawConnection(port) as conn:
        for _ in range(6):
            response = conn.request("GET", "/whoami")
            assert response.status == 200
            instances.append(response.json()["instance"])
        body = bytes(range(256)) * 512
        echoed = conn.request("POST", "/echo", body=body).json()
    assert sorted(instances) == ["a", "a", "a", "b", "b", "b"]
    assert all(x != y for x, y in itertools.pairwise(instances)), instances
    assert echoed["body_length"] == len(body)
    assert echoed["headers"]["X-Forwarded-For"] == "127.0.0.1"

    proc.signal(signal.SIGTERM)
    code, _ = wait_exit(proc, 10)
    assert code == 0, proc.output()
