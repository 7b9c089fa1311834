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
import secrets
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from portico.config.load import load_file
from portico.config.model import Config
from portico.control.bus import STATS_EVERY, MasterBus, follow_master
from portico.control.health import apply_state, log_transition
from portico.control.orchestrator import Orchestrator
from portico.control.prober import Prober
from portico.dataplane.accesslog import AccessLog
from portico.dataplane.connection import ClientConnection
from portico.dataplane.context import ClientSettings, ProxyContext
from portico.dataplane.exchange import HandlerFactory
from portico.dataplane.listener import bind_socket
from portico.dataplane.local import LocalExchange
from portico.dataplane.proxy import ProxyExchange
from portico.dataplane.static import static_handler
from portico.errors import ConfigError
from portico.policy.health import Transition
from portico.runtime.endpoint import Endpoint
from portico.runtime.routes import KIND_PROXY, KIND_STATIC
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


def with_secrets(config: Config) -> Config:
    """Fill in sticky-cookie secrets left unset, once, so every worker signs alike."""
    upstreams = {}
    for name, up in config.upstreams.items():
        if up.sticky is not None and up.sticky.secret is None:
            sticky = up.sticky.model_copy(update={"secret": secrets.token_hex(32)})
            up = up.model_copy(update={"sticky": sticky})
        upstreams[name] = up
    return config.model_copy(update={"upstreams": upstreams})


def load_reload(current: Config, source: ConfigSource) -> Config | None:
    """Load the config for a reload; None (and the reasons logged) if it is refused."""
    try:
        new = source.load()
    except ConfigError as exc:
        for path, reason in exc.problems:
            log.error("reload refused, keeping the running config: %s: %s", path, reason)
        return None
    for key in STATIC_KEYS:
        if getattr(new.server, key) != getattr(current.server, key):
            log.warning("server.%s changed: takes effect on restart only", key)
    # Keep the running secrets so sticky cookies stay valid across the reload.
    upstreams = dict(new.upstreams)
    for name, up in new.upstreams.items():
        old = current.upstreams.get(name)
        if up.sticky is not None and up.sticky.secret is None and old and old.sticky:
            upstreams[name] = up.model_copy(
                update={"sticky": up.sticky.model_copy(update={"secret": old.sticky.secret})}
            )
    return with_secrets(new.model_copy(update={"upstreams": upstreams}))


def managed_upstreams(config: Config) -> set[str]:
    """Upstreams whose endpoints the control plane owns (apps and discovery)."""
    return {
        name
        for name, up in config.upstreams.items()
        if up.app is not None or up.discover is not None
    }


def _on_transition(upstream: str, ep: Endpoint, transition: Transition) -> None:
    """Single process: the prober's endpoints are the data plane's own."""
    log_transition(upstream, ep, transition)
    ep.up = transition.healthy
    if transition.healthy:
        ep.healthy_since = transition.at


async def run_dataplane(
    config: Config,
    *,
    reuse_port: bool,
    source: ConfigSource | None = None,
    state_pipe: Connection | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain within ``server.shutdown_grace``.

    SIGHUP reloads the routes and upstreams from ``source``. Without ``state_pipe`` this
    process runs the active health checks itself; with it, a master does and sends state.
    """
    loop = asyncio.get_running_loop()
    snapshot = compile_config(config)
    settings = ClientSettings.from_config(config.server.limits, config.server.timeouts)
    access = config.access_log
    access_log = AccessLog(access.format, access.path) if access.format != "off" else None
    handlers: dict[str, HandlerFactory] = {KIND_PROXY: ProxyExchange, KIND_STATIC: static_handler}
    ctx = ProxyContext(loop, snapshot, settings, access_log, handlers, LocalExchange)
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
    prober: Prober | None = None
    stop_bus: Callable[[], None] | None = None
    if state_pipe is None:
        prober = Prober(_on_transition)
        prober.update(ctx.snapshot)
    else:
        stop_bus = follow_master(state_pipe, loop, lambda: ctx.snapshot, managed_upstreams(config))
    orchestrator: Orchestrator | None = None
    if state_pipe is None and managed_upstreams(config):
        orchestrator = Orchestrator(config, lambda: ctx.snapshot)
        orchestrator.start()
        loop.add_signal_handler(signal.SIGUSR1, orchestrator.rolling_restart)
    if source is not None:
        state = {"config": config}

        def reload() -> None:
            new = load_reload(state["config"], source)
            if new is None:
                return
            state["config"] = new
            ctx.snapshot = compile_config(new, previous=ctx.snapshot)
            if prober is not None:
                prober.update(ctx.snapshot)
            log.info("reloaded %s: %d upstream(s)", source.path, len(new.upstreams))

        loop.add_signal_handler(signal.SIGHUP, reload)
    flusher: asyncio.TimerHandle | None = None
    if access_log is not None:

        def flush() -> None:
            nonlocal flusher
            access_log.flush()
            flusher = loop.call_later(ACCESS_LOG_FLUSH, flush)

        flusher = loop.call_later(ACCESS_LOG_FLUSH, flush)
    await stop.wait()
    if prober is not None:
        prober.stop()
    if stop_bus is not None:
        stop_bus()
    log.info("stopping: %d open connections", len(ctx.connections))
    await _drain(ctx, servers, config.server.shutdown_grace)
    if orchestrator is not None:
        await orchestrator.stop()  # after the clients: their requests finished first
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


def run_worker(
    config: Config,
    reuse_port: bool,
    source: ConfigSource | None = None,
    state_pipe: Connection | None = None,
) -> int:
    raise_open_files_limit()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(
            run_dataplane(config, reuse_port=reuse_port, source=source, state_pipe=state_pipe)
        )


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


def _worker_entry(
    config_data: dict[str, Any], source: ConfigSource | None, state_pipe: Connection
) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    config = Config.model_validate(config_data)
    raise SystemExit(run_worker(config, reuse_port=True, source=source, state_pipe=state_pipe))


def _check_bindable(config: Config) -> None:
    for address in config.server.listen:
        bind_socket(address, reuse_port=True, backlog=1).close()


def serve(config: Config, source: ConfigSource | None = None) -> int:
    """Run the gateway described by ``config`` until told to stop. Returns an exit status.

    With a ``source``, SIGHUP reloads routes and upstreams from it.
    """
    config = with_secrets(config)
    pid_file = config.server.pid_file
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        if config.server.workers == 1:
            return run_worker(config, reuse_port=False, source=source)
        _check_bindable(config)
        return _Master(config, source).run()
    finally:
        if pid_file:
            with contextlib.suppress(OSError):
                os.unlink(pid_file)


class _Master:
    """Spawns and supervises N data-plane workers sharing the listening port, and runs the
    active health checks once for all of them."""

    def __init__(self, config: Config, source: ConfigSource | None) -> None:
        self.config = config
        self.source = source
        self.mp = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.started: dict[int, float] = {}  # worker pid -> when it was spawned
        self.snapshot = compile_config(config)
        self.bus = MasterBus(lambda: self.snapshot, self._on_demand)
        self.bus.managed = managed_upstreams(config)
        self.prober = Prober(self._on_transition)
        self.orchestrator: Orchestrator | None = None
        if self.bus.managed:
            # Two reports: the draining flag reaches the workers, their counts come back.
            self.orchestrator = Orchestrator(config, lambda: self.snapshot, 3 * STATS_EVERY)

    def _on_transition(self, upstream: str, ep: Endpoint, transition: Transition) -> None:
        log_transition(upstream, ep, transition)
        apply_state(self.snapshot, upstream, ep.label, transition.healthy, transition.at)
        self.bus.publish(("health", upstream, ep.label, transition.healthy))

    def _on_demand(self, upstream: str) -> None:
        if self.orchestrator is not None:
            supervisor = self.orchestrator.supervisors.get(upstream)
            if supervisor is not None:
                supervisor.demand()

    def _spawn(self) -> Any:
        ours, theirs = self.mp.Pipe(duplex=True)
        data = self.config.model_dump(mode="json")
        proc = self.mp.Process(target=_worker_entry, args=(data, self.source, theirs), daemon=False)
        proc.start()
        theirs.close()
        assert proc.pid is not None
        self.started[proc.pid] = time.monotonic()
        self.bus.add(proc.pid, ours)
        return proc

    def _signal_workers(self, sig: int) -> None:
        for proc in self.procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def _reload(self) -> None:
        if self.source is None:
            return
        new = load_reload(self.config, self.source)
        if new is None:
            return
        self.config = new
        self.snapshot = compile_config(new, previous=self.snapshot)
        self.prober.update(self.snapshot)
        self._signal_workers(signal.SIGHUP)

    def run(self) -> int:
        raise_open_files_limit()
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        self.procs = [self._spawn() for _ in range(self.config.server.workers)]
        log.info("master %d started %d workers", os.getpid(), len(self.procs))
        self.prober.update(self.snapshot)
        if self.orchestrator is not None:
            self.orchestrator.start()
            loop.add_signal_handler(signal.SIGUSR1, self.orchestrator.rolling_restart)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATS_EVERY)
            if stop.is_set():
                break
            self.bus.publish_endpoint_changes()
            for i, proc in enumerate(self.procs):
                if proc.is_alive():
                    continue
                self.bus.remove(proc.pid)
                log.warning("worker %s exited with %s; replacing it", proc.pid, proc.exitcode)
                if time.monotonic() - self.started.pop(proc.pid, 0.0) < WORKER_MIN_UPTIME:
                    await asyncio.sleep(WORKER_MIN_UPTIME)  # crashing at start: do not spin
                if not stop.is_set():
                    self.procs[i] = self._spawn()
        self.prober.stop()
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_grace + 5
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(1)
        self.bus.close()
        if self.orchestrator is not None:
            await self.orchestrator.stop()  # after the workers: their requests finished first
        return 0
