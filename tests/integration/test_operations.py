"""Operating Portico safely: signalling commands reach only a Portico master, pid files say
the truth, a busy port is one line naming its holder, and user mistakes print no traceback.

Every process here is real (``python -m portico``, ``sleep``, a socket held by a child
Python) and stopped by the test that started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import respond
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess, process_gone
from tests.support.waiting import wait_for_port, wait_until


def portico_cmd(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portico", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def bystander() -> Iterator[ManagedProcess]:
    """An unrelated process (``sleep``) that no Portico command may ever signal."""
    proc = ManagedProcess(["sleep", "300"], name="sleep").start()
    yield proc
    proc.stop(timeout=5)


@pytest.fixture
def started() -> Iterator[Callable[..., ManagedProcess]]:
    procs: list[ManagedProcess] = []

    def start(*args: str) -> ManagedProcess:
        proc = ManagedProcess([sys.executable, "-m", "portico", *args], name="portico-cli")
        procs.append(proc)
        return proc.start()

    yield start
    for proc in reversed(procs):
        proc.stop(timeout=10)


@pytest.mark.parametrize("command", ["restart", "reload", "stop"])
def test_signalling_an_unrelated_process_is_refused(
    command: str, bystander: ManagedProcess
) -> None:
    result = portico_cmd(command, "--pid", str(bystander.pid))
    assert result.returncode == 1, result
    assert f"process {bystander.pid} is not Portico" in result.stderr
    assert "sleep 300" in result.stderr
    assert "Traceback" not in result.stderr
    time.sleep(0.2)  # a signal, had one been sent, is delivered by now
    assert bystander.alive(), "the unrelated process was signalled"


def test_a_stale_pid_file_is_detected(tmp_path: Path, bystander: ManagedProcess) -> None:
    # A pid file written by an earlier Portico whose pid the kernel has since handed to
    # `sleep`: the start time recorded in the file is not the process's.
    reused = tmp_path / "reused.pid"
    reused.write_text(f"{bystander.pid} 1000.000\n")
    result = portico_cmd("restart", "--pid-file", str(reused))
    assert result.returncode == 1
    assert "is stale" in result.stderr and "another process" in result.stderr
    # A pid file of a process that is gone.
    gone = ManagedProcess(["true"], name="true").start()
    gone.wait(5)
    dead = tmp_path / "dead.pid"
    dead.write_text(f"{gone.pid} 1000.000\n")
    result = portico_cmd("stop", "--pid-file", str(dead))
    assert result.returncode == 1
    assert f"stale: process {gone.pid} is gone" in result.stderr
    time.sleep(0.2)
    assert bystander.alive()


def test_pid_file_lifecycle_reload_and_stop(
    tmp_path: Path, raw_backend: RawBackendFactory, started: Callable[..., ManagedProcess]
) -> None:
    backend = raw_backend(respond())
    port = free_port()
    pid_file = tmp_path / "portico.pid"
    config = tmp_path / "portico.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\npid_file = "{pid_file}"\n'
        f'[upstreams.app]\nbackends = ["{backend.url}"]\n'
    )
    proc = started("serve", "-c", str(config))
    wait_for_port(port, timeout=15)
    pid, _ = pid_file.read_text().split()
    assert int(pid) == proc.pid
    # No temporary file left beside it: it was written by rename.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".portico-pid")] == []

    # A second Portico with the same pid file refuses to start while the first runs.
    other = portico_cmd("serve", "-c", str(config), timeout=30)
    assert other.returncode == 2
    assert f"names Portico process {proc.pid}" in other.stderr
    assert "Traceback" not in other.stderr
    assert pid_file.read_text().split()[0] == str(proc.pid)

    reload = portico_cmd("reload", "-c", str(config))
    assert reload.returncode == 0, reload.stderr
    wait_until(lambda: "reloaded" in proc.output(), 10, message="the reload to be logged")
    restart = portico_cmd("restart", "--pid-file", str(pid_file))
    assert restart.returncode == 0, restart.stderr
    wait_until(lambda: "no apps to restart" in proc.output(), 10, message="SIGUSR1 logged")
    assert proc.alive(), "SIGUSR1 without apps must not stop the server"

    stop = portico_cmd("stop", "--pid-file", str(pid_file))
    assert stop.returncode == 0, stop.stderr
    assert f"process {proc.pid} stopped" in stop.stdout
    assert proc.wait(5) == 0
    assert not pid_file.exists(), "the pid file outlived its process"


def test_reload_of_a_server_without_a_file_is_refused(
    raw_backend: RawBackendFactory, started: Callable[..., ManagedProcess]
) -> None:
    backend = raw_backend(respond())
    port = free_port()
    proc = started("proxy", "--listen", f"127.0.0.1:{port}", "--backend", backend.url)
    wait_for_port(port, timeout=15)
    result = portico_cmd("reload", "--pid", str(proc.pid))
    assert result.returncode == 1
    assert "runs `portico proxy`, which has no config file to reload" in result.stderr
    assert proc.alive()


def test_a_second_portico_on_a_busy_port_is_one_line_naming_the_holder(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    backend = raw_backend(respond())
    config = {"upstreams": {"app": {"backends": [backend.url]}}}
    first = portico(config, workers=2)
    address = f"127.0.0.1:{first.port}"
    for args in (
        ["proxy", "--listen", address, "--backend", backend.url, "--workers", "2"],
        ["proxy", "--listen", address, "--backend", backend.url],
        ["run", "--listen", address, "--", "sleep", "60"],
    ):
        result = portico_cmd(*args)
        assert result.returncode == 2, (args, result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"cannot listen on {address}: Address already in use" in lines[0]
        assert f"held by process {first.pid}" in lines[0]
    assert not process_gone(first.pid)


def test_a_port_held_by_another_program_is_named(tmp_path: Path) -> None:
    port = free_port()
    holder = ManagedProcess(
        [
            sys.executable,
            "-c",
            "import socket, time\n"
            "s = socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(300)",
        ],
        name="holder",
    ).start()
    try:
        wait_for_port(port, timeout=10)
        # The holder shares with SO_REUSEPORT: Portico must still refuse, whatever its workers.
        result = portico_cmd(
            "proxy", "--listen", f"127.0.0.1:{port}", "-b", "http://127.0.0.1:1", "-w", "2"
        )
        assert result.returncode == 2
        assert f"held by process {holder.pid}" in result.stderr
        assert "Traceback" not in result.stderr
        debug = portico_cmd(
            "--debug", "proxy", "--listen", f"127.0.0.1:{port}", "-b", "http://127.0.0.1:1"
        )
        assert "Traceback" in debug.stderr, "--debug shows the traceback"
    finally:
        holder.stop(timeout=5)


def test_an_unwritable_access_log_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "portico.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[access_log]\nformat = "common"\npath = "{tmp_path}/missing/access.log"\n'
        '[upstreams.app]\nbackends = ["http://127.0.0.1:1"]\n'
    )
    result = portico_cmd("serve", "-c", str(config))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"portico: cannot start: access_log.path: directory {tmp_path}/missing does not exist"
    )


def test_a_reload_while_workers_start_does_not_kill_them(
    tmp_path: Path, raw_backend: RawBackendFactory, started: Callable[..., ManagedProcess]
) -> None:
    backend = raw_backend(respond())
    port = free_port()
    config = tmp_path / "portico.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nworkers = 2\n'
        f'[upstreams.app]\nbackends = ["{backend.url}"]\n'
    )
    proc = started("serve", "-c", str(config))
    # SIGHUP as soon as the workers exist, before they can have set up their handlers.
    wait_until(
        lambda: len(psutil.Process(proc.pid).children()) >= 2,
        15,
        interval=0.005,
        message="the workers to be spawned",
    )
    os.kill(proc.pid, signal.SIGHUP)
    wait_for_port(port, timeout=15)
    wait_until(lambda: proc.output().count("reloaded") >= 2, 15, message="both workers reloaded")
    assert "exited with" not in proc.output(), proc.output()
