"""Composition root: build the data plane from a config, run it, stop it gracefully.

Process model. With ``workers = 1`` (the default) everything runs in one process. With N > 1
this process becomes a small master: it spawns N worker processes that each bind the listen
addresses with SO_REUSEPORT (the kernel spreads new connections across them), forwards
SIGTERM/SIGINT to them and replaces a worker that dies. Later, the control plane (health
checks, orchestration) runs once in the master and publishes endpoint state to workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import resource
import signal
import time
from collections.abc import Callable
from typing import Any

from portico.config.load import load_file
from portico.config.model import Config
from portico.dataplane.accesslog import AccessLog
from portico.dataplane.connection import ClientConnection
from portico.dataplane.context import ClientSettings, ProxyContext
from portico.dataplane.listener import bind_socket
from portico.errors import ConfigError
from portico.runtime.snapshot import compile_config

log = logging.getLogger("portico")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"

# Seconds between access-log flushes.
ACCESS_LOG_FLUSH = 1.0
# A worker that dies within this many seconds of starting counts as crashing; the master
# then waits before replacing it instead of spinning.
WORKER_MIN_UPTIME = 2.0


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit: thousands of clients need thousands of fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop
    return uvloop.new_event_loop


class ConfigSource:
    """Where a reload reads the config from: a file plus the CLI's overrides. Picklable."""

    def __init__(self, path: str, overrides: dict[str, object] | None = None) -> None:
        self.path = path
        self.overrides = dict(overrides or {})

    def load(self) -> Config:
        return load_file(self.path, self.overrides)


# Settings that only take effect on restart (sockets and processes are made from them once).
STATIC_KEYS = ("listen", "workers", "backlog")


def reload_snapshot(ctx: ProxyContext, current: Config, source: ConfigSource) -> Config:
    """Load, compile and swap in a new snapshot; on any problem keep the old one.

    Returns the config now in force. Endpoint state carries over by address.
    """
    try:
        new = source.load()
    except ConfigError as exc:
        for path, reason in exc.problems:
            log.error("reload refused, keeping the running config: %s: %s", path, reason)
        return current
    for key in STATIC_KEYS:
        if getattr(new.server, key) != getattr(current.server, key):
            log.warning("server.%s changed: takes effect on restart only", key)
    ctx.snapshot = compile_config(new, previous=ctx.snapshot)
    log.info("reloaded %s: %d upstream(s)", source.path, len(new.upstreams))
    return new


async def run_dataplane(
    config: Config, *, reuse_port: bool, source: ConfigSource | None = None
) -> int:
    """Serve until SIGTERM/SIGINT, then drain within ``server.shutdown_grace``.

    SIGHUP reloads the routes and upstreams from ``source``.
    """
    loop = asyncio.get_running_loop()
    snapshot = compile_config(config)
    settings = ClientSettings.from_config(config.server.limits, config.server.timeouts)
    access = config.access_log
    access_log = AccessLog(access.format, access.path) if access.format != "off" else None
    ctx = ProxyContext(loop, snapshot, settings, access_log)
    servers: list[asyncio.Server] = []
    for address in config.server.listen:
        sock = bind_socket(address, reuse_port=reuse_port, backlog=config.server.backlog)
        server = await loop.create_server(
            lambda: ClientConnection(ctx), sock=sock, backlog=config.server.backlog
        )
        servers.append(server)
        host, port = sock.getsockname()[:2]
        log.info("listening on http://%s:%d (pid %d)", host, port, os.getpid())
    # Everything built so far lives as long as the process: move it out of the collector's
    # sight so full collections stay short and do not show up as latency spikes.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if source is not None:
        state = {"config": config}

        def reload() -> None:
            state["config"] = reload_snapshot(ctx, state["config"], source)

        loop.add_signal_handler(signal.SIGHUP, reload)
    flusher: asyncio.TimerHandle | None = None
    if access_log is not None:

        def flush() -> None:
            nonlocal flusher
            access_log.flush()
            flusher = loop.call_later(ACCESS_LOG_FLUSH, flush)

        flusher = loop.call_later(ACCESS_LOG_FLUSH, flush)
    await stop.wait()
    log.info("stopping: %d open connections", len(ctx.connections))
    await _drain(ctx, servers, config.server.shutdown_grace)
    if flusher is not None:
        flusher.cancel()
    if access_log is not None:
        access_log.close()
    return 0


async def _drain(ctx: ProxyContext, servers: list[asyncio.Server], grace: float) -> None:
    ctx.closing = True
    for server in servers:
        server.close()
    for conn in list(ctx.connections):
        conn.shutdown()
    deadline = time.monotonic() + grace
    # Poll rather than wire a completion event through every connection: shutdown is rare.
    while ctx.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(ctx.connections):
        conn.abort()
    ctx.pools.close_all()
    for server in servers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)


def run_worker(config: Config, reuse_port: bool, source: ConfigSource | None = None) -> int:
    raise_open_files_limit()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(run_dataplane(config, reuse_port=reuse_port, source=source))


def _die_with_parent() -> None:
    """Linux: have the kernel SIGTERM this worker if the master dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        raise SystemExit(0)  # the master died before the signal was armed


def _worker_entry(config_data: dict[str, Any], source: ConfigSource | None) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    config = Config.model_validate(config_data)
    raise SystemExit(run_worker(config, reuse_port=True, source=source))


def _check_bindable(config: Config) -> None:
    for address in config.server.listen:
        bind_socket(address, reuse_port=True, backlog=1).close()


def serve(config: Config, source: ConfigSource | None = None) -> int:
    """Run the gateway described by ``config`` until told to stop. Returns an exit status.

    With a ``source``, SIGHUP reloads routes and upstreams from it.
    """
    workers = config.server.workers
    if workers == 1:
        return run_worker(config, reuse_port=False, source=source)
    _check_bindable(config)
    return _Master(config, source).run()


class _Master:
    """Spawns and supervises N data-plane workers sharing the listening port."""

    def __init__(self, config: Config, source: ConfigSource | None) -> None:
        self.config = config
        self.source = source
        self.data = config.model_dump(mode="json")
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.stopping = False

    def _spawn(self) -> Any:
        proc = self.ctx.Process(target=_worker_entry, args=(self.data, self.source), daemon=False)
        proc.start()
        proc.started_at = time.monotonic()
        return proc

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    def _on_reload(self, _signum: int, _frame: object) -> None:
        if self.source is None:
            return
        try:
            self.source.load()
        except ConfigError as exc:
            for path, reason in exc.problems:
                log.error("reload refused, keeping the running config: %s: %s", path, reason)
            return
        for proc in self.procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGHUP)

    def run(self) -> int:
        raise_open_files_limit()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_reload)
        self.procs = [self._spawn() for _ in range(self.config.server.workers)]
        log.info("master %d started %d workers", os.getpid(), len(self.procs))
        while not self.stopping:
            time.sleep(0.2)
            for i, proc in enumerate(self.procs):
                if proc.is_alive() or self.stopping:
                    continue
                crashed = time.monotonic() - proc.started_at < WORKER_MIN_UPTIME
                log.warning("worker %s exited with %s; replacing it", proc.pid, proc.exitcode)
                if crashed:
                    time.sleep(WORKER_MIN_UPTIME)
                if not self.stopping:
                    self.procs[i] = self._spawn()
        deadline = time.monotonic() + self.config.server.shutdown_grace + 5
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        return 0
