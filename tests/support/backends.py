"""Backends for integration tests: real Flask under gunicorn, and raw asyncio servers.

``GunicornFlask`` runs ``examples/flask-app`` the way it would run in production.
``RawBackend`` runs a user-supplied ``async def handler(reader, writer)`` (see ``behaviours``
for ready-made ones) on its own event loop in a background thread, and records every byte each
connection received, so a test can assert exactly what reached the backend, e.g. that a
smuggled second request never did.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self, SupportsIndex

import psutil

from tests.support.behaviours import (
    CONNECTION_INDEX,
    OK_RESPONSE,
    Handler,
    Request,
    close_after_headers,
    close_after_request,
    close_immediately,
    echo_http,
    garbage,
    never_respond,
    read_request,
    reset,
    reset_mid_body,
    respond,
    slow_headers,
)
from tests.support.lifecycle import StartStop
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess
from tests.support.waiting import wait_until

__all__ = [
    "OK_RESPONSE",
    "GunicornFlask",
    "Handler",
    "RawBackend",
    "Request",
    "close_after_headers",
    "close_after_request",
    "close_immediately",
    "echo_http",
    "garbage",
    "never_respond",
    "read_request",
    "reset",
    "reset_mid_body",
    "respond",
    "slow_headers",
]

FLASK_APP_DIR = Path(__file__).resolve().parents[2] / "examples" / "flask-app"


@functools.cache
def _gunicorn_has_control_socket() -> bool:
    # gunicorn 25+ opens a control socket at one fixed path per user by default; several
    # instances in parallel would fight over it, so it is turned off where it exists.
    from gunicorn.config import KNOWN_SETTINGS

    return any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)


# A raw backend's listen backlog: asyncio's default (100) overflows when Portico opens
# hundreds of upstream connections at once, and the dropped SYNs then look like Portico's
# fault (a connect retried after 1 s, 3 s...). The kernel caps it at net.core.somaxconn.
BACKLOG = 4096

# A raw backend's StreamReader buffer limit: above any request head a test sends (portico's own
# default limit is 32 KiB), so readuntil() never fails on a legitimately large head.
READER_LIMIT = 1024 * 1024


# --- gunicorn + Flask -----------------------------------------------------------------------


class GunicornFlask(StartStop):
    """``examples/flask-app`` under gunicorn on 127.0.0.1, instance name in ``INSTANCE``.

    The sync worker (default) closes every connection after its response; use
    ``worker_class="gthread"`` for a keep-alive backend.
    """

    def __init__(
        self,
        name: str = "app",
        *,
        port: int | None = None,
        worker_class: Literal["sync", "gthread"] = "sync",
        threads: int = 4,
        workers: int = 1,
        graceful_timeout: int = 3,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port or free_port()
        argv = [
            sys.executable, "-m", "gunicorn",
            "--chdir", str(FLASK_APP_DIR),
            "-b", f"127.0.0.1:{self.port}",
            "-w", str(workers),
            "--worker-class", worker_class,
            "--graceful-timeout", str(graceful_timeout),
        ]  # fmt: skip
        if _gunicorn_has_control_socket():
            argv.append("--no-control-socket")
        if worker_class == "gthread":
            argv += ["--threads", str(threads)]
        argv += [*extra_args, "app:app"]
        self.process = ManagedProcess(
            argv, env={"INSTANCE": name, **(env or {})}, name=f"gunicorn-{name}"
        )

    def __repr__(self) -> str:
        return f"<GunicornFlask {self.name} {self.url} {self.process!r}>"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The gunicorn master's PID (the workers are its children)."""
        return self.process.pid

    def worker_pids(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.pid).children()]

    def start(self, timeout: float = 20.0, wait: bool = True) -> Self:
        self.process.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until ``/health`` answers 200; fail at once with the output if gunicorn exits."""
        try:
            wait_until(self._healthy, timeout, interval=0.05, message=f"{self!r} /health")
        except AssertionError as e:
            self.stop()
            raise AssertionError(f"{e}\n--- gunicorn output ---\n{self.output()}") from None

    def _healthy(self) -> bool:
        if not self.process.alive():
            raise AssertionError(f"gunicorn {self.name} exited with {self.process.returncode}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.process.stop(timeout=timeout)

    def output(self) -> str:
        return self.process.output()


# --- raw asyncio backend --------------------------------------------------------------------


@dataclass
class RawConnectionRecord:
    """What one accepted connection received, and how it ended."""

    index: int
    data: bytearray = field(default_factory=bytearray)
    peer_closed: bool = False  # EOF received from the peer
    closed: bool = False  # the handler finished and the backend closed it
    transport: asyncio.WriteTransport | None = field(default=None, repr=False)


class _RecordingReader(asyncio.StreamReader):
    """A StreamReader that records every chunk the transport delivers, before anyone reads."""

    def __init__(
        self,
        record: RawConnectionRecord,
        lock: threading.Lock,
        limit: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(limit=limit, loop=loop)
        self._record = record
        self._lock = lock

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        with self._lock:
            self._record.data += bytes(data)
        super().feed_data(data)

    def feed_eof(self) -> None:
        self._record.peer_closed = True
        super().feed_eof()


class RawBackend(StartStop):
    """A TCP server on 127.0.0.1 whose every connection is served by ``handler``.

    Runs its own event loop in a daemon thread between ``start()`` and ``stop()``. Exceptions
    a handler raises (other than connection errors, which misbehaving peers cause on purpose)
    are kept in ``errors`` for the test to assert on.
    """

    def __init__(self, handler: Handler, *, port: int | None = None) -> None:
        self.handler = handler
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.errors: list[BaseException] = []
        self._records: list[RawConnectionRecord] = []
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<RawBackend {self.url} connections={self.connections}>"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the event loop thread runs (between start() and stop())."""
        return self._thread is not None and self._thread.is_alive()

    # --- what was received ------------------------------------------------------------------

    @property
    def received(self) -> list[bytes]:
        """The bytes each connection received so far, in accept order."""
        with self._lock:
            return [bytes(r.data) for r in self._records]

    @property
    def records(self) -> list[RawConnectionRecord]:
        with self._lock:
            return list(self._records)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._records)

    def all_received(self) -> bytes:
        """Every connection's bytes, concatenated in accept order."""
        return b"".join(self.received)

    def wait_for_connections(self, n: int, timeout: float = 5.0) -> None:
        wait_until(lambda: self.connections >= n, timeout, message=f"{n} connections to {self}")

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 5.0) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name=f"raw-backend-{self.port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout):
            raise AssertionError(f"{self!r} did not start within {timeout}s")
        if failure:
            raise failure[0]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise AssertionError(f"{self!r}: event loop thread did not stop within {timeout}s")
        self._loop = self._thread = None

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                loop.create_server(self._protocol, self.host, self.port, backlog=BACKLOG)
            )
        except BaseException as e:
            failure.append(e)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for record in self.records:
            if record.transport is not None and not record.closed:
                record.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _protocol(self) -> asyncio.StreamReaderProtocol:
        loop = self._loop
        assert loop is not None
        with self._lock:
            record = RawConnectionRecord(index=len(self._records))
            self._records.append(record)
        reader = _RecordingReader(record, self._lock, limit=READER_LIMIT, loop=loop)
        return asyncio.StreamReaderProtocol(reader, functools.partial(self._serve, record))

    async def _serve(
        self,
        record: RawConnectionRecord,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        record.transport = writer.transport
        CONNECTION_INDEX.set(record.index)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the peer (or stop()) ended the connection; that is the test's business
        except Exception as e:
            self.errors.append(e)
        finally:
            writer.close()
            record.closed = True
            self._tasks.discard(task)
