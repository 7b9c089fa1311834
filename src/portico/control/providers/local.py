"""Local processes as instances: any command that serves HTTP on the port it is given.

Each instance runs in its own process group (so a stop reaches gunicorn's workers too) and
asks the kernel to SIGKILL it if Portico dies (PR_SET_PDEATHSIG). That signal reaches the
direct child only, so a small guard runs beside each instance and kills its whole group when
Portico dies: none is left behind even when Portico itself is killed with SIGKILL. Its output
is logged line by line with the instance id as prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
from collections import deque

import psutil

from portico.config.model import App
from portico.control.appcheck import TAIL_LINES
from portico.control.ports import PORTS
from portico.control.providers.base import Instance

log = logging.getLogger("portico.app")

PR_SET_PDEATHSIG = 1

# The guard: its stdin is a pipe whose only writer is Portico, so `read` returns when Portico
# exits, however it exits, and the instance's process group ($1) is killed. Without it,
# gunicorn's workers outlive their killed master by up to their timeout (15 s by default).
GUARD = 'read _; kill -s KILL -- "-$1" 2>/dev/null'


@functools.cache
def _gunicorn_has_control_socket() -> bool:
    """gunicorn 25+ opens a control socket at one fixed path per user unless told not to;
    several instances would fight over it."""
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return False
    return any(getattr(s, "name", "") == "control_socket_disable" for s in KNOWN_SETTINGS)


def _die_with_portico() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalInstance:
    __slots__ = ("_guard", "_proc", "_ps", "_reader", "host", "id", "port", "tail")

    def __init__(self, instance_id: str, port: int, proc: asyncio.subprocess.Process) -> None:
        self.id = instance_id
        self.host = "127.0.0.1"
        self.port = port
        self._proc = proc
        self._ps: psutil.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._guard: asyncio.subprocess.Process | None = None
        # Its last lines of output, for the crash report (control.appcheck.cause).
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)

    def __repr__(self) -> str:
        return f"<LocalInstance {self.id} pid={self.pid} port={self.port}>"

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.returncode is None

    def exit_code(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    def cpu_percent(self) -> float:
        """CPU use of the instance's whole process tree since the last call (psutil)."""
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            total = self._ps.cpu_percent(None)
            for child in self._ps.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.cpu_percent(None)
            return float(total)
        except psutil.Error:
            return 0.0


class LocalProvider:
    """Runs instances as child processes on free loopback ports."""

    def __init__(self) -> None:
        self._instances: set[LocalInstance] = set()

    async def start(self, app_name: str, spec: App, instance_id: str) -> LocalInstance:
        port = PORTS.allocate()
        env = dict(os.environ)
        env.update(spec.env)
        env["PORT"] = str(port)
        env["PORTICO_INSTANCE"] = instance_id
        argv = spec.argv(port)
        if spec.wsgi and _gunicorn_has_control_socket():
            argv.append("--no-control-socket")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=spec.cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_portico,
            )
        except OSError:
            PORTS.release(port)
            raise
        instance = LocalInstance(instance_id, port, proc)
        instance._reader = asyncio.get_running_loop().create_task(self._pump(instance, proc))
        instance._guard = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", GUARD, "portico-guard", str(proc.pid),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # not in Portico's group: a kill of that group reaches it not
        )  # fmt: skip
        self._instances.add(instance)
        return instance

    async def _pump(self, instance: LocalInstance, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            instance.tail.append(text)
            log.info("[%s] %s", instance.id, text)

    async def stop(self, instance: Instance, timeout: float) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout``."""
        assert isinstance(instance, LocalInstance)
        if instance.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(instance.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(instance.wait(), timeout)
            except TimeoutError:
                log.warning("%s did not stop in %gs: SIGKILL", instance.id, timeout)
        # Whatever is left in the group (workers that outlived their master) goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(instance.pid, signal.SIGKILL)
        if instance.alive():
            await instance.wait()
        if instance._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(instance._reader, 1.0)
        guard = instance._guard
        if guard is not None:
            with contextlib.suppress(ProcessLookupError):
                guard.kill()  # before its stdin closes: the group id is free for reuse now
            await guard.wait()
            if guard.stdin is not None:
                guard.stdin.close()
        self._instances.discard(instance)
        PORTS.release(instance.port)

    def close(self) -> None:
        """Last resort on exit: kill every process group still running."""
        for instance in list(self._instances):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(instance.pid, signal.SIGKILL)
            if instance._guard is not None:
                with contextlib.suppress(ProcessLookupError):
                    instance._guard.kill()
        self._instances.clear()
