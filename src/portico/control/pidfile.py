"""Pid files, and knowing that a process id still names a Portico master before signalling it.

A pid file holds ``PID START`` where START is the process's start time (seconds since the
epoch, as psutil reports it). A pid alone is not an identity: once the process is gone the
kernel hands the number out again, and a signal sent to it would reach whatever got it. The
start time tells the two apart; the command line tells a Portico master from anything else
when only a pid is given.

Files are written atomically (a temporary file in the same directory, then ``rename``), so a
reader never sees a half-written one, and removed on exit only if they still name this
process (a second Portico that took the file over keeps it).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

import psutil

# The commands that run a master; `check`, `restart` and friends never do.
SERVING_COMMANDS = ("serve", "proxy", "run")
# Start times are floats rounded differently by different readers; this much apart is "same".
START_TOLERANCE = 1.0


class NotPortico(Exception):
    """The target is not a running Portico master; the message says why, for the user."""


@dataclass(frozen=True, slots=True)
class Master:
    pid: int
    command: str  # serve, proxy or run


def write(path: str) -> None:
    """Write this process's id and start time to ``path``, atomically."""
    me = psutil.Process()
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".portico-pid-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{me.pid} {me.create_time():.3f}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def claim(path: str) -> str | None:
    """Write the pid file unless it names a live Portico master (then raise NotPortico with
    the reason to refuse the start). Returns a note when it replaced a stale file."""
    note = None
    if os.path.exists(path):
        try:
            other = read(path)
        except NotPortico as exc:
            note = f"replacing {exc}"
        else:
            if other.pid != os.getpid():
                raise NotPortico(
                    f"{path} names Portico process {other.pid} ({other.command}), still running;"
                    " stop it first (portico stop --pid-file ...)"
                )
    write(path)
    return note


def remove(path: str) -> None:
    """Remove ``path`` if it still names this process."""
    with contextlib.suppress(OSError, ValueError):
        pid, _ = _parse(path)
        if pid == os.getpid():
            os.unlink(path)


def read(path: str) -> Master:
    """The live Portico master ``path`` names. Raises NotPortico when the file is missing,
    malformed or stale (its process is gone, or the pid now belongs to another process)."""
    try:
        pid, started = _parse(path)
    except FileNotFoundError:
        raise NotPortico(f"{path}: no such pid file (is Portico running?)") from None
    except (OSError, ValueError) as exc:
        raise NotPortico(f"{path}: not a Portico pid file ({exc})") from None
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
    except psutil.NoSuchProcess:
        raise NotPortico(f"{path} is stale: process {pid} is gone") from None
    if started is not None and abs(created - started) > START_TOLERANCE:
        raise NotPortico(
            f"{path} is stale: process {pid} started after the file was written,"
            " so it is another process"
        )
    return verify(pid)


def verify(pid: int) -> Master:
    """``pid`` as a Portico master, or NotPortico saying what it is instead."""
    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
    except psutil.NoSuchProcess:
        raise NotPortico(f"no process {pid}") from None
    except psutil.AccessDenied:
        raise NotPortico(f"process {pid} belongs to another user") from None
    command = portico_command(argv)
    if command is None:
        if _parent_is_portico(proc):
            raise NotPortico(f"process {pid} is a Portico worker; signal its master {proc.ppid()}")
        shown = " ".join(argv)[:80] or proc.name()
        raise NotPortico(f"process {pid} is not Portico ({shown}); refusing to signal it")
    return Master(pid, command)


def portico_command(argv: list[str]) -> str | None:
    """The Portico command (serve, proxy, run) an argv runs, or None if it runs no Portico
    master: ``portico CMD``, ``python -m portico CMD`` and ``python .../bin/portico CMD``."""
    for i, arg in enumerate(argv):
        is_module = arg == "portico" and i > 0 and argv[i - 1] == "-m"
        is_script = os.path.basename(arg) == "portico" and (i == 0 or argv[i - 1] != "-m")
        if not (is_module or is_script):
            continue
        rest = [a for a in argv[i + 1 :] if not a.startswith("-")]
        if rest and rest[0] in SERVING_COMMANDS:
            return rest[0]
    return None


def _parent_is_portico(proc: psutil.Process) -> bool:
    """Workers (and app instances) run other command lines under a Portico master."""
    with contextlib.suppress(psutil.Error):
        parent = proc.parent()
        return parent is not None and portico_command(parent.cmdline()) is not None
    return False


def _parse(path: str) -> tuple[int, float | None]:
    with open(path) as f:
        parts = f.read().split()
    if not parts:
        raise ValueError("empty")
    pid = int(parts[0])
    if pid <= 0:
        raise ValueError(f"bad pid {pid}")
    return pid, float(parts[1]) if len(parts) > 1 else None
