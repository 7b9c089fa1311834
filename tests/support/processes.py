"""Subprocesses that tests start and are sure to stop.

Each ``ManagedProcess`` runs in its own session, hence its own process group whose id is the
leader's PID. Stopping signals the leader first (the way a service manager would, so the
program's own shutdown path is what gets tested), then SIGKILLs the whole group: whatever the
leader left behind (gunicorn workers, portico worker processes) cannot outlive the test.

Output (stdout and stderr together) goes to a temporary file rather than a pipe, so a chatty
process can never block on a full pipe that nobody reads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

import psutil

# Every process started and not yet stopped; conftest sweeps it at the end of the session as a
# last line of defence for a process a test started outside a fixture.
_live: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


class ManagedProcess:
    """One subprocess in its own process group, with captured output."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.name = name or os.path.basename(self.argv[0])
        self.cwd = cwd
        # Unbuffered so that output() shows what a Python program printed just before a failure.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_path: str | None = None

    def __repr__(self) -> str:
        state = "not started" if self._popen is None else f"pid={self.pid} rc={self.returncode}"
        return f"<ManagedProcess {self.name} {state}>"

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> Self:
        if self._popen is not None:
            raise RuntimeError(f"{self!r} already started")
        fd, self._log_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        _live.add(self)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send ``sig`` to the leader, wait up to ``timeout``, then SIGKILL the group.

        Returns the leader's exit code (negative for a signal), None if never started.
        """
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(sig)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                popen.wait(timeout)
        # The leader is gone; sweep any child it left behind in its group.
        self._kill_group()
        _live.discard(self)
        return popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole group at once (a crash, as far as the program can tell)."""
        return self.stop(signal.SIGKILL, timeout=5.0)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the leader only."""
        self._require().send_signal(sig)

    def _kill_group(self) -> None:
        popen = self._require()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self if self._popen is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        if self._log_path is not None and self._popen is not None and self.returncode is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._log_path)

    # --- state ------------------------------------------------------------------------------

    def _require(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self!r} was never started")
        return self._popen

    @property
    def pid(self) -> int:
        return self._require().pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the leader has exited (polled), else None."""
        return self._require().poll()

    def alive(self) -> bool:
        return self.returncode is None

    def wait(self, timeout: float) -> int:
        """Wait for the leader to exit by itself; raises subprocess.TimeoutExpired."""
        return self._require().wait(timeout)

    def output(self) -> str:
        """Everything written to stdout and stderr so far."""
        if self._log_path is None:
            return ""
        with open(self._log_path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def group_pids(self) -> list[int]:
        """PIDs still in this process group (leader included while it runs)."""
        return pids_in_group(self.pid)

    def rss(self, include_children: bool = True) -> int:
        return rss(self.pid, include_children=include_children)


def stop_all() -> None:
    """Stop every ManagedProcess that is still running."""
    for proc in list(_live):
        proc.stop(timeout=5.0)


# --- process inspection ---------------------------------------------------------------------


def rss(pid: int, include_children: bool = True) -> int:
    """Resident set size in bytes of ``pid``, plus its descendants if asked."""
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)] if include_children else [proc]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie waiting to be reaped)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def pids_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) PIDs whose process group is ``pgid``."""
    found = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and not process_gone(pid):
                found.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def listening_workers(master: int, port: int) -> list[int]:
    """Children of ``master`` that listen on ``port``: Portico's data-plane workers."""
    found = []
    for child in psutil.Process(master).children():
        try:
            conns = child.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            found.append(child.pid)
    return sorted(found)
