"""The Docker Engine, as the Docker provider and discovery reach it.

The ``docker`` SDK (``pip install 'portico[docker]'``) is blocking, so every call runs on a
small thread pool of its own, never on the event loop. The pool is private rather than the
loop's default executor because a container stop blocks for up to its stop timeout, and a few
of those must not starve whatever else uses the default executor.

Engine events come from the SDK's blocking stream, read by one daemon thread per feed and
handed to the loop with ``call_soon_threadsafe``. When the stream breaks (the engine
restarted), the thread reconnects with a bounded back-off, and after every connection, the
first included, the consumer's ``on_resync`` runs on the loop: events missed in the gap are
made up for by listing containers again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

log = logging.getLogger("portico.docker")

T = TypeVar("T")

# Threads for blocking engine calls per engine: enough for a few container stops to overlap
# with starts, stats and lists.
ENGINE_THREADS = 8
# Back-off between attempts to re-open a broken events stream.
RECONNECT_MIN = 0.2
RECONNECT_MAX = 5.0

EventCallback = Callable[[dict[str, Any]], None]


class EngineError(OSError):
    """The Docker Engine could not be reached, or refused a request. An ``OSError`` so the
    supervisor treats a failed container start like a failed process start (back-off)."""


class NotFound(EngineError):
    """The container (or image) does not exist (any more)."""


def _connect(docker_host: str | None) -> Any:
    try:
        import docker
    except ImportError:
        raise EngineError(
            "Docker support needs the docker SDK: pip install -e '.[docker]'"
        ) from None
    try:
        # Unset: DOCKER_HOST (and DOCKER_TLS_VERIFY, ...) or the default socket, as the CLI.
        client = docker.DockerClient(base_url=docker_host) if docker_host else docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        where = docker_host or "$DOCKER_HOST or the default socket"
        raise EngineError(f"cannot reach the Docker Engine at {where}: {exc}") from None
    return client


def _translated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run an SDK call, turning its exceptions into ours (the SDK's carry no common base
    with OSError, and requests' do but say little)."""
    import docker.errors
    import requests

    try:
        return fn(*args, **kwargs)
    except (docker.errors.NotFound, docker.errors.ImageNotFound) as exc:
        raise NotFound(str(exc.explanation or exc)) from None
    except docker.errors.APIError as exc:
        raise EngineError(str(exc.explanation or exc)) from None
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise EngineError(f"Docker Engine: {exc}") from None


class Engine:
    """One Docker Engine connection: blocking SDK calls off the loop, and event feeds."""

    def __init__(self, docker_host: str | None) -> None:
        self.docker_host = docker_host
        self.client: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            ENGINE_THREADS, thread_name_prefix="portico-docker"
        )
        self._opening: asyncio.Lock | None = None
        self._feeds: list[EventFeed] = []

    def __repr__(self) -> str:
        return f"<Engine {self.docker_host or '$DOCKER_HOST'}>"

    async def open(self) -> None:
        """Connect (once; later calls return at once). Raises EngineError."""
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self.client is None:
                loop = asyncio.get_running_loop()
                self.client = await loop.run_in_executor(self._pool, _connect, self.docker_host)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the engine's threads, errors as EngineError."""
        loop = asyncio.get_running_loop()
        call = functools.partial(_translated, fn, *args, **kwargs)
        return await loop.run_in_executor(self._pool, call)

    def feed(
        self,
        filters: Mapping[str, object],
        on_event: EventCallback,
        on_resync: Callable[[], None],
    ) -> EventFeed:
        feed = EventFeed(self, dict(filters), on_event, on_resync)
        self._feeds.append(feed)
        return feed

    def close(self) -> None:
        for feed in self._feeds:
            feed.close()
        self._feeds.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()


class EventFeed:
    """Container events from the engine, delivered on the loop. Reconnects by itself."""

    def __init__(
        self,
        engine: Engine,
        filters: dict[str, object],
        on_event: EventCallback,
        on_resync: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._filters = filters
        self._on_event = on_event
        self._on_resync = on_resync
        self._closed = threading.Event()
        self._stream: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Subscribe; returns once the engine has accepted the subscription, so no event
        after this point is missed. Raises EngineError if it cannot subscribe."""
        self._loop = asyncio.get_running_loop()
        first: concurrent.futures.Future[None] = concurrent.futures.Future()
        # A daemon thread: it blocks in a socket read, and must never hold up interpreter exit.
        self._thread = threading.Thread(
            target=self._read, args=(first,), name="portico-docker-events", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(first)

    def close(self) -> None:
        self._closed.set()
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()  # unblocks the reading thread

    def _deliver(self, fn: Callable[..., None], *args: Any) -> bool:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody to tell any more
            return False
        return True

    def _read(self, first: concurrent.futures.Future[None]) -> None:
        delay = RECONNECT_MIN
        while not self._closed.is_set():
            try:
                stream = _translated(self._engine.client.events, decode=True, filters=self._filters)
            except EngineError as exc:
                if not first.done():
                    first.set_exception(exc)
                    return
                log.warning("docker events: %s; retrying in %gs", exc, delay)
                self._closed.wait(delay)
                delay = min(RECONNECT_MAX, delay * 2)
                continue
            self._stream = stream
            if self._closed.is_set():
                stream.close()
                break
            if not first.done():
                first.set_result(None)
            delay = RECONNECT_MIN
            if not self._deliver(self._on_resync):
                return
            try:
                for event in stream:
                    if not self._deliver(self._on_event, event):
                        return
            except Exception as exc:  # a broken stream is retried, whatever broke it
                if not self._closed.is_set():
                    log.warning("docker events stream broke: %s", exc)
            if not self._closed.is_set():
                log.warning("docker events stream ended; reconnecting")
                self._closed.wait(delay)
