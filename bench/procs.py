"""Start, wait for and stop the benchmark's processes, always by PID.

Every service is started in its own session, so a Ctrl-C in the terminal reaches only the
benchmark script, which then stops each service itself (see `Service.stop`) in reverse order.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

# How long a service gets to exit after SIGTERM before it is killed.
STOP_GRACE_S = 5.0
# How long a service may take to answer its first request.
READY_TIMEOUT_S = 15.0


def free_port() -> int:
    """A port the kernel says is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    """`taskset` execs the command, so the PID we get is the pinned process itself."""
    return ["taskset", "-c", str(cpu), *argv]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:port (a service that is not HTTP)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def http_get_size(port: int, path: str, host: str | None = None) -> int | None:
    """Body length of a 200 answer to GET path (with this Host, if given), or None on any
    other outcome."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        body = response.read()
        return len(body) if response.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(
                f"{self.name} (pid {self.pid}) exited with status {self.proc.returncode}:\n"
                f"{self.log_tail()}"
            )

    def wait_ready(self, port: int, expect: dict[str, int], host: str | None = None) -> None:
        """Wait until every path in `expect` answers 200 with exactly the expected length."""

        def ready() -> bool:
            self.check_alive()
            return all(http_get_size(port, path, host) == size for path, size in expect.items())

        what = f"{self.name} to serve {sorted(expect)} with status 200 on :{port}"
        try:
            wait_until(ready, READY_TIMEOUT_S, what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its log ends:\n{self.log_tail()}") from None

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if needed; then kill any child that outlived its parent."""
        if not self.alive():
            return
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        self.proc.terminate()
        try:
            self.proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # psutil.Process remembers each child's start time, so a recycled PID is never hit.
        _, leftover = psutil.wait_procs(children, timeout=STOP_GRACE_S)
        for child in leftover:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(leftover, timeout=STOP_GRACE_S)


def start(name: str, argv: Sequence[str], log_path: Path) -> Service:
    """Start argv with stdout and stderr appended to log_path (which it may also write)."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(name, proc, log_path)


def rss_bytes(pid: int) -> tuple[int, int]:
    """(total VmRSS, process count) of pid and all its descendants, from /proc/PID/status.

    Summing over workers counts shared pages once per process, so it overstates a
    multi-worker total slightly; for one worker it is exact.
    """
    pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    total = 0
    for each in pids:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024  # the kernel reports kB
    return total, len(pids)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of pid and its descendants so far, from /proc/PID/stat.

    CPU time per request is what a proxy costs whatever else the machine runs; req/s also
    depends on how much of its core the neighbours left it.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    total = 0
    for each in pids:
        stat = Path(f"/proc/{each}/stat").read_text()
        # Fields after the command name (which may hold spaces) start at "state" (field 3);
        # utime and stime are fields 14 and 15.
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks
