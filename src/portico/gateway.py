"""Composition root: ``Gateway`` builds everything from a config and owns its lifecycle
(``start``, ``reload``, ``scale``, ``stop``).

Process model. With ``workers = 1`` (the default) everything runs in one process. With N > 1
this process becomes a small master: it spawns N worker processes that each bind the listen
addresses with SO_REUSEPORT (the kernel spreads new connections across them), forwards
SIGTERM/SIGINT to them and replaces a worker that dies. The control plane (health checks,
apps, discovery) runs once, in the master, which publishes endpoint state to the workers and
hands each of them the config of every reload (``control.bus``).
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
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from portico.admin.api import Api
from portico.admin.metrics import Family
from portico.admin.server import AdminServer
from portico.config.admin import is_loopback
from portico.config.load import load_file
from portico.config.model import Config
from portico.control import logformat, pidfile
from portico.control.bus import STATS_EVERY, MasterBus, follow_master
from portico.control.health import apply_state, end_ejection, log_transition, release_unchecked
from portico.control.orchestrator import Orchestrator
from portico.control.prober import Prober
from portico.control.stopping import StopSignals, release_held, stop_apps, wait_drained
from portico.dataplane.accesslog import AccessLog
from portico.dataplane.connection import ClientConnection
from portico.dataplane.context import ClientSettings, ProxyContext
from portico.dataplane.exchange import HandlerFactory
from portico.dataplane.listener import bind_socket, listen_queue_warning
from portico.dataplane.local import LocalExchange
from portico.dataplane.metrics import (
    MetricTotals,
    RequestMetrics,
    fold_local,
    metrics_enabled,
    report_message,
)
from portico.dataplane.proxy import ProxyExchange
from portico.dataplane.sharedmem import SharedTables, traffic_stores
from portico.dataplane.static import static_handler
from portico.errors import ConfigError, StartupError
from portico.policy.health import Transition
from portico.runtime.endpoint import Endpoint
from portico.runtime.membership import steer
from portico.runtime.routes import KIND_PROXY, KIND_STATIC
from portico.runtime.snapshot import Snapshot, compile_config
from portico.runtime.stageorder import stage_order
from portico.runtime.status import StatusProviders
from portico.runtime.traffic import connection_limits
from portico.runtime.waf import WafRulesError

if TYPE_CHECKING:
    from portico.control.acme import CertManager
    from portico.dataplane.tlslisten import TlsListeners

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


# Settings that only take effect on restart: sockets, processes and the pid file are made
# from them once. A reload reports them by key and keeps the running values.
STATIC_KEYS = ("listen", "workers", "backlog", "pid_file")


def with_secrets(config: Config) -> Config:
    """Fill in sticky-cookie secrets left unset, once, so every worker signs alike."""
    upstreams = {}
    for name, up in config.upstreams.items():
        if up.sticky is not None and up.sticky.secret is None:
            sticky = up.sticky.model_copy(update={"secret": secrets.token_hex(32)})
            up = up.model_copy(update={"sticky": sticky})
        upstreams[name] = up
    # Session-ticket secrets too: every worker derives the same ticket keys (dataplane.tls).
    tls = [
        t if t.ticket_secret else t.model_copy(update={"ticket_secret": secrets.token_hex(32)})
        for t in config.tls
    ]
    return config.model_copy(update={"upstreams": upstreams, "tls": tls})


@dataclass(slots=True)
class ReloadResult:
    """What a reload did. Refused: ``problems`` holds ``(key path, reason)`` and nothing
    changed. Applied: ``restart_required`` names the static keys that changed but keep their
    running values, ``changed`` the top-level sections that now run the new values."""

    applied: bool
    problems: list[tuple[str, str]] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def log(self, source: str) -> None:
        if not self.applied:
            for path, reason in self.problems:
                log.error("reload refused, keeping the running config: %s: %s", path, reason)
            return
        for key in self.restart_required:
            log.warning("%s changed: takes effect on restart only", key)
        log.info("reloaded %s: %s", source, ", ".join(self.changed) or "nothing changed")


def prepare_reload(current: Config, new: Config) -> tuple[Config, ReloadResult]:
    """The config a reload runs: ``new`` with the running static keys and sticky secrets.

    Secrets carry over so sticky cookies stay valid; static keys keep their running values so
    the next reload compares against what really runs.
    """
    restart = [
        f"server.{k}" for k in STATIC_KEYS if getattr(new.server, k) != getattr(current.server, k)
    ]
    if new.kubernetes != current.kubernetes:
        restart.append("kubernetes")  # one API client and one leader election per process
    server = new.server.model_copy(update={k: getattr(current.server, k) for k in STATIC_KEYS})
    upstreams = dict(new.upstreams)
    for name, up in new.upstreams.items():
        old = current.upstreams.get(name)
        if up.sticky is not None and up.sticky.secret is None and old and old.sticky:
            upstreams[name] = up.model_copy(
                update={"sticky": up.sticky.model_copy(update={"secret": old.sticky.secret})}
            )
    # Ticket secrets carry over too, so a reload does not end resumable sessions.
    tls = list(new.tls)
    for i, (t, was) in enumerate(zip(new.tls, current.tls, strict=False)):
        if not t.ticket_secret and was.listen == t.listen:
            tls[i] = t.model_copy(update={"ticket_secret": was.ticket_secret})
    admin = new.admin
    if (admin is None) != (current.admin is None):
        restart.append("admin")  # the listener is bound (or not) at start only
        admin = current.admin
    elif admin is not None and current.admin is not None:
        # Its addresses are bound once, like server.listen: keep the running ones.
        for key in ("listen", "unix_socket"):
            if getattr(admin, key) != getattr(current.admin, key):
                restart.append(f"admin.{key}")
        running = {k: getattr(current.admin, k) for k in ("listen", "unix_socket")}
        admin = admin.model_copy(update=running)
        if admin.listen and not is_loopback(admin.listen) and not admin.all_tokens():
            why = f"the running admin listener on {admin.listen} is not loopback-only: keep a token"
            return current, ReloadResult(False, problems=[("admin.token", why)])
    config = with_secrets(
        new.model_copy(
            update={
                "server": server,
                "upstreams": upstreams,
                "tls": tls,
                "kubernetes": current.kubernetes,
                "admin": admin,
            }
        )
    )
    changed = [
        name for name in Config.model_fields if getattr(config, name) != getattr(current, name)
    ]
    return config, ReloadResult(True, restart_required=restart, changed=changed)


def managed_upstreams(config: Config) -> set[str]:
    """Upstreams whose endpoints the control plane owns (apps and discovery)."""
    return {
        name
        for name, up in config.upstreams.items()
        if up.app is not None or up.discover is not None or up.kubernetes is not None
    }


def _open_access_log(config: Config) -> AccessLog | None:
    access = config.access_log
    return AccessLog(access.format, access.path) if access.format != "off" else None


class Serving:
    """One process's data plane: listening sockets, the shared ``ProxyContext`` and the
    access log. ``apply`` swaps in a new config; connections pick it up per request."""

    def __init__(self, config: Config, shared: SharedTables | None = None) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        snapshot = compile_config(config, traffic=traffic_stores(config, shared))
        settings = ClientSettings.from_config(config.server.limits, config.server.timeouts)
        handlers: dict[str, HandlerFactory] = {
            KIND_PROXY: ProxyExchange,
            KIND_STATIC: static_handler,
        }
        self.ctx = ProxyContext(
            self.loop,
            snapshot,
            settings,
            _open_access_log(config),
            handlers,
            LocalExchange,
        )
        if snapshot.traffic is not None:
            self.ctx.conn_limits = connection_limits(config.traffic, snapshot.traffic)
        if metrics_enabled(config):
            self.ctx.metrics = RequestMetrics()
        self.servers: list[asyncio.Server] = []
        self._flusher: asyncio.TimerHandle | None = None
        self.tls: TlsListeners | None = None
        if config.tls:  # imported only then: plain HTTP loads no TLS code
            from portico.dataplane.tlslisten import TlsListeners

            self.tls = TlsListeners(config, self.ctx)

    async def bind(self, reuse_port: bool) -> None:
        config = self.config
        ctx = self.ctx
        for address in config.server.listen:
            sock = bind_socket(address, reuse_port=reuse_port, backlog=config.server.backlog)
            server = await self.loop.create_server(
                lambda: ClientConnection(ctx), sock=sock, backlog=config.server.backlog
            )
            self.servers.append(server)
            host, port = sock.getsockname()[:2]
            log.info("listening on http://%s:%d (pid %d)", host, port, os.getpid())
        if self.tls is not None:
            self.servers += await self.tls.bind(reuse_port, config.server.backlog)
        self._flusher = self.loop.call_later(ACCESS_LOG_FLUSH, self._flush)

    def _flush(self) -> None:
        # Reads ctx.access_log each time: a reload may switch it on, off or to another file.
        if self.ctx.access_log is not None:
            self.ctx.access_log.flush()
        self._flusher = self.loop.call_later(ACCESS_LOG_FLUSH, self._flush)

    def apply(self, config: Config) -> None:
        """Run ``config`` from the next request on. Pure compile against the running snapshot
        (endpoints and their state carried by address), then plain assignments: cannot fail
        half-way. In-flight requests keep the service and settings they started with."""
        ctx = self.ctx
        ctx.snapshot = compile_config(config, previous=ctx.snapshot)
        release_unchecked(ctx.snapshot)
        ctx.settings = ClientSettings.from_config(config.server.limits, config.server.timeouts)
        # The access log is reopened on every reload, so log rotation needs only a SIGHUP.
        old_log, ctx.access_log = ctx.access_log, _open_access_log(config)
        if old_log is not None:
            old_log.close()
        if self.tls is not None:
            self.tls.apply(config)
        # Metrics follow the admin section; counters kept while they stay on.
        if not metrics_enabled(config):
            ctx.metrics = None
        elif ctx.metrics is None:
            ctx.metrics = RequestMetrics()
        self.config = config

    async def stop(self, grace: float, immediate: asyncio.Event) -> None:
        if held := release_held(self.ctx.snapshot):
            log.info("stopping: answered %d request(s) held for a cold start with 503", held)
        await _drain(self.ctx, self.servers, grace, immediate)
        if self._flusher is not None:
            self._flusher.cancel()
        if self.tls is not None:
            self.tls.close()
        if self.ctx.access_log is not None:
            self.ctx.access_log.close()


class Control:
    """The control plane of a gateway: active health checks and the orchestrator (apps and
    discovery). Runs once per gateway: in the only process, or in the master."""

    def __init__(
        self,
        config: Config,
        snapshot_of: Callable[[], Snapshot],
        on_transition: Callable[[str, Endpoint, Transition], None],
        on_pass: Callable[[str, Endpoint], None],
        drain_settle: float = 0.0,
    ) -> None:
        self.snapshot_of = snapshot_of
        self.prober = Prober(on_transition, on_pass=on_pass)
        self.orchestrator = Orchestrator(config, snapshot_of, drain_settle)

    def start(self) -> None:
        self.prober.update(self.snapshot_of())
        self.orchestrator.start()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self._restart_apps)

    def _restart_apps(self) -> None:
        # Handled even without apps (a reload may add some): the default action of a stray
        # `kill -USR1` would terminate the server.
        if self.orchestrator.supervisors or self.orchestrator.fleets:
            self.orchestrator.rolling_restart()
        else:
            log.info("SIGUSR1: no apps to restart")

    def apply(self, config: Config, previous: Snapshot) -> None:
        """Follow a reload whose snapshot is already swapped in (``previous`` is the one it
        replaced: apps removed by the reload drain against it)."""
        self.prober.update(self.snapshot_of())
        self.orchestrator.apply(config, previous)

    def scale(self, upstream: str, n: int) -> bool:
        supervisor = self.orchestrator.supervisors.get(upstream) or self.orchestrator.fleets.get(
            upstream
        )
        if supervisor is None:
            return False
        supervisor.set_desired(n)
        return True

    def stop_checks(self) -> None:
        self.prober.stop()

    async def stop(self, immediate: asyncio.Event) -> None:
        self.prober.stop()
        await stop_apps(self.orchestrator, immediate)


class Gateway:
    """The lifecycle of one gateway: ``start``, ``reload(config)``, ``scale``, ``stop``.

    SIGHUP (and later the admin API) calls ``reload``. With ``server.workers = 1`` this process
    serves and runs the control plane; with more, it is the master: it runs the control plane
    on its own snapshot, validates and compiles a reload once, and sends the resulting config
    (secrets filled in) to every worker over ``control.bus``; each worker compiles it against
    its own previous snapshot, which is pure and cannot fail, so all run the same config.
    """

    def __init__(self, config: Config, source: ConfigSource | None = None) -> None:
        self.config = with_secrets(config)
        self.source = source
        self.serving: Serving | None = None
        self.master: _Master | None = None
        self._snapshot: Snapshot | None = None  # the master's own (no Serving there)
        self.control: Control | None = None
        self._reload_pending = False  # a SIGHUP that came before start() finished
        self.certs: CertManager | None = None  # automatic certificates (control.acme)
        # Challenge answers being served now, replayed to a worker that starts meanwhile.
        self.tls_pending: dict[tuple[str, str], tuple[Any, ...]] = {}
        # Admin API (admin.fleet.Fleet): other features add their status here by name.
        self.status = StatusProviders()
        self.started_at = time.time()
        self.admin: AdminServer | None = None
        self._metrics = MetricTotals()  # one process: the scrape folds the counters in here

    def snapshot(self) -> Snapshot:
        if self.serving is not None:
            return self.serving.ctx.snapshot
        assert self._snapshot is not None
        return self._snapshot

    async def start(self) -> None:
        config = self.config
        if config.server.workers == 1:
            self.serving = Serving(config)
            await self.serving.bind(reuse_port=False)
            self.control = Control(config, self.snapshot, self._on_transition, self._on_pass)
        else:
            self._snapshot = compile_config(config)
            await self._start_admin()  # before the workers: a busy port fails on its own
            # Two reports: the draining flag reaches the workers, their counts come back.
            self.control = Control(
                config, self.snapshot, self._on_transition, self._on_pass, 3 * STATS_EVERY
            )
            self.master = _Master(self)
            self.master.start()
        self.control.start()
        if any(t.auto is not None for t in config.tls):
            from portico.control.acme import CertManager

            self.certs = CertManager(config, self._publish_tls)
            self.certs.start()
            self.status.register("certificates", self.certs.status)
        uses_kubernetes = any(u.kubernetes is not None for u in config.upstreams.values()) or any(
            u.app is not None and u.app.kubernetes is not None for u in config.upstreams.values()
        )
        if uses_kubernetes or config.kubernetes.leader_election is not None:
            self.status.register("kubernetes", self.control.orchestrator.kubernetes_status)
        if self.admin is None:
            await self._start_admin()
        if self._reload_pending:
            self.reload_from_source()

    def _publish_tls(self, message: tuple[Any, ...]) -> None:
        """Certificates and challenge answers from ``control.acme`` to whoever serves."""
        _, kind, what, value = message
        if kind != "reload":
            if value is None:
                self.tls_pending.pop((kind, what), None)
            else:
                self.tls_pending[(kind, what)] = message
        if self.serving is not None and self.serving.tls is not None:
            self.serving.tls.on_message(message)
        if self.master is not None:
            self.master.bus.publish(message)

    def _on_transition(self, upstream: str, ep: Endpoint, transition: Transition) -> None:
        log_transition(upstream, ep, transition)
        if self.control is not None:
            self.control.orchestrator.events.add(
                upstream, "health", f"{ep.label} {transition.reason}"
            )
        apply_state(self.snapshot(), upstream, ep.label, transition.healthy, transition.at)
        if self.master is not None:
            self.master.bus.publish(("health", upstream, ep.label, transition.healthy))

    def _on_pass(self, upstream: str, ep: Endpoint) -> None:
        if self.master is not None:
            # Ejections are each worker's own (passive checks see that worker's traffic).
            self.master.bus.publish(("pass", upstream, ep.label))
        else:
            end_ejection(self.snapshot(), upstream, ep.label, asyncio.get_running_loop().time())

    def reload(self, new: Config) -> ReloadResult:
        """Apply ``new`` (already validated) to every section, or refuse it and keep the old.

        Static keys (listen, workers, backlog, pid file) keep their running values and are
        reported. Everything else runs from the next request on; requests in flight finish
        on the config they started with, and keep-alive connections stay open.
        """
        config, result = prepare_reload(self.config, new)
        if not result.applied:
            return result
        if problems := stage_order(config):  # a route would let requests past auth
            return ReloadResult(False, problems=problems)
        previous = self.snapshot()
        try:
            if self.serving is not None:
                self.serving.apply(config)
            else:
                self._snapshot = compile_config(config, previous=previous)
                release_unchecked(self._snapshot)
        except WafRulesError as exc:  # a rule file the config names does not load
            return ReloadResult(False, problems=[(exc.key, exc.reason)])
        except Exception as exc:  # a compile bug must not take the gateway down
            log.exception("reload failed to compile")
            return ReloadResult(False, problems=[("config", f"cannot compile: {exc}")])
        self.config = config
        assert self.control is not None
        self.control.apply(config, previous)
        self.control.orchestrator.events.add(
            "config", "reload", f"reloaded: {', '.join(result.changed) or 'nothing changed'}"
        )
        if self.master is not None:
            self.master.send_config(config)
        return result

    def reload_from_source(self) -> ReloadResult | None:
        """SIGHUP: load the config file again and reload it; log what happened."""
        if self.source is None:
            return None
        if self.control is None:
            self._reload_pending = True  # the signal handler is in place before start()
            return None
        self._reload_pending = False
        try:
            new = self.source.load()
        except ConfigError as exc:
            result = ReloadResult(False, problems=list(exc.problems))
        else:
            result = self.reload(new)
        result.log(self.source.path)
        return result

    def scale(self, upstream: str, n: int) -> bool:
        """Ask for ``n`` instances of app ``upstream`` (clamped to its min and max)."""
        return self.control is not None and self.control.scale(upstream, n)

    # --- admin.metrics.MetricsSource ------------------------------------------------------

    def metric_totals(self) -> MetricTotals:
        """Request counters summed over every worker (and gauges of the live ones)."""
        if self.master is not None:
            return self.master.bus.metrics
        if self.serving is not None:
            fold_local(self._metrics, self.serving.ctx)
        return self._metrics

    def orchestrator(self) -> Orchestrator | None:
        """The apps and their supervisors (None before start)."""
        return self.control.orchestrator if self.control is not None else None

    def extra_families(self) -> list[Family]:
        """Metric families of optional features: certificate expiry when TLS is on."""
        from portico.admin.tlsmetrics import tls_families

        return tls_families(self.config, self.certs.status if self.certs is not None else None)

    async def _start_admin(self) -> None:
        # In the master with workers: it holds the control plane and the summed counters.
        admin = self.config.admin
        if admin is not None:
            api = Api(self)
            self.admin = AdminServer(api)
            await self.admin.start(admin.listen, admin.unix_socket)
            self.admin.background(api.watch())

    # --- admin.fleet.Fleet ------------------------------------------------------------------

    def load_source(self) -> Config | None:
        """The config file read again (raises ConfigError), or None without a file."""
        return self.source.load() if self.source is not None else None

    def source_path(self) -> str | None:
        return self.source.path if self.source is not None else None

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.master.procs if p.pid] if self.master is not None else []

    def ejections(self) -> dict[tuple[str, str], int]:
        """(upstream, endpoint) -> processes whose outlier detection ejects it now."""
        if self.master is not None:
            return self.master.bus.ejections
        return {
            (name, ep.label): 1
            for name, service in self.snapshot().services.items()
            for ep in service.endpoints
            if ep.ejected
        }

    def set_endpoint(
        self, upstream: str, label: str, *, draining: bool | None, weight: int | None
    ) -> None:
        """An operator's drain/undrain/weight: here, then in every worker over the bus."""
        service = self.snapshot().services.get(upstream)
        if service is not None:
            steer(service, label, draining, weight)
        if self.master is not None:
            self.master.bus.publish(("endpoint", upstream, label, draining, weight))

    async def stop(self, immediate: asyncio.Event | None = None) -> None:
        """Drain clients (or the workers), then stop the control plane's apps. Setting
        ``immediate`` (a second Ctrl-C) cuts every wait short; instances are still stopped."""
        immediate = immediate or asyncio.Event()
        if self.admin is not None:
            await self.admin.stop()
        assert self.control is not None
        if self.certs is not None:
            self.certs.stop()
        self.control.stop_checks()
        if self.serving is not None:
            await self.serving.stop(self.config.server.shutdown_grace, immediate)
        if self.master is not None:
            await self.master.stop(immediate)
        await self.control.stop(immediate)  # after the clients: their requests finished first


async def run_dataplane(
    config: Config,
    *,
    reuse_port: bool,
    source: ConfigSource | None = None,
    state_pipe: Connection | None = None,
    shared: SharedTables | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain within ``server.shutdown_grace``.

    Without ``state_pipe`` this is the whole gateway (one process; SIGHUP reloads from
    ``source``); with it, a worker of a master that runs the control plane, sends endpoint
    state and hands out reloaded configs.
    """
    loop = asyncio.get_running_loop()
    if state_pipe is None:
        gateway = Gateway(config, source)

        def waiting_for() -> str:
            open_now = len(gateway.serving.ctx.connections) if gateway.serving else 0
            return f"{open_now} open connection(s)"

        signals = StopSignals(waiting_for, config.server.shutdown_grace)
        signals.install(loop)
        if source is not None:
            loop.add_signal_handler(signal.SIGHUP, gateway.reload_from_source)
        else:
            loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP: no config file to reload")
        await gateway.start()
        _freeze_heap()
        await signals.graceful.wait()
        await gateway.stop(signals.immediate)
        return 0
    # Reload is the master's: a SIGHUP sent to the whole process group must not kill us.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    serving = Serving(config, shared)
    signals = StopSignals(
        lambda: f"{len(serving.ctx.connections)} open connection(s)",
        config.server.shutdown_grace,
    )
    signals.install(loop, worker=True)
    await serving.bind(reuse_port=reuse_port)
    _freeze_heap()
    managed = managed_upstreams(config)

    def on_config(data: dict[str, Any]) -> None:
        new = Config.model_validate(data)  # validated by the master: cannot be refused
        serving.apply(new)
        managed.clear()
        managed.update(managed_upstreams(new))
        log.info("worker %d runs the reloaded config", os.getpid())

    on_tls = serving.tls.on_message if serving.tls is not None else None
    stop_bus = follow_master(
        state_pipe,
        loop,
        lambda: serving.ctx.snapshot,
        managed,
        on_config,
        on_other=on_tls,
        metrics_report=lambda: report_message(serving.ctx),
    )
    await signals.graceful.wait()
    stop_bus()
    await serving.stop(serving.config.server.shutdown_grace, signals.immediate)
    if (last := report_message(serving.ctx)) is not None:
        # What the drained connections counted since the last report: not one is lost.
        with contextlib.suppress(OSError, ValueError):
            state_pipe.send(last)
    return 0


def _freeze_heap() -> None:
    # Everything built so far lives as long as the process: move it out of the collector's
    # sight so full collections stay short and do not show up as latency spikes.
    gc.collect()
    gc.freeze()


async def _drain(
    ctx: ProxyContext, servers: list[asyncio.Server], grace: float, immediate: asyncio.Event
) -> None:
    ctx.closing = True
    for server in servers:
        server.close()
    for conn in list(ctx.connections):
        conn.shutdown()
    await wait_drained(lambda: len(ctx.connections), grace, immediate)
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
    shared: SharedTables | None = None,
) -> int:
    raise_open_files_limit()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(
            run_dataplane(
                config, reuse_port=reuse_port, source=source, state_pipe=state_pipe, shared=shared
            )
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
    config_data: dict[str, Any],
    source: ConfigSource | None,
    state_pipe: Connection,
    shared: SharedTables | None = None,
) -> None:
    """Entry point of a spawned worker process."""
    _die_with_parent()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop's handler is in place
    logformat.configure()  # the master's format, from the environment it passed down
    config = Config.model_validate(config_data)
    raise SystemExit(
        run_worker(config, reuse_port=True, source=source, state_pipe=state_pipe, shared=shared)
    )


def _check_bindable(config: Config) -> None:
    for address in [*config.server.listen, *(a for t in config.tls for a in t.listen)]:
        # Without SO_REUSEPORT: a port another process holds, even one that shares it (a
        # second Portico), is refused here, so the port is only ever shared by our workers.
        bind_socket(address, reuse_port=False, backlog=1).close()


def serve(config: Config, source: ConfigSource | None = None) -> int:
    """Run the gateway described by ``config`` until told to stop. Returns an exit status.

    With a ``source``, SIGHUP reloads the whole config from it (see ``Gateway.reload``).
    """
    config = with_secrets(config)
    if warning := listen_queue_warning(config.server.backlog):
        log.warning("%s", warning)
    pid_file = config.server.pid_file
    if pid_file:
        try:
            note = pidfile.claim(pid_file)
        except (pidfile.NotPortico, OSError) as exc:
            raise StartupError(f"pid file: {exc}") from None
        if note:
            log.info("%s", note)
    if any(t.auto is not None for t in config.tls):
        from portico.control.acme import prepare

        prepare(config)  # placeholder certificates until the first issuance
    try:
        if config.server.workers == 1:
            return run_worker(config, reuse_port=False, source=source)
        _check_bindable(config)
        return run_master(config, source)
    finally:
        if pid_file:
            pidfile.remove(pid_file)


def run_master(config: Config, source: ConfigSource | None) -> int:
    raise_open_files_limit()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_master_main(config, source))


async def _master_main(config: Config, source: ConfigSource | None) -> int:
    loop = asyncio.get_running_loop()
    gateway = Gateway(config, source)

    def waiting_for() -> str:
        master = gateway.master
        alive = sum(p.is_alive() for p in master.procs) if master else 0
        return f"{alive} worker(s) to finish"

    def second_signal() -> None:
        if gateway.master is not None:
            gateway.master.signal_workers(signal.SIGTERM)  # their second one: at once

    signals = StopSignals(waiting_for, config.server.shutdown_grace, on_immediate=second_signal)
    signals.install(loop)
    if source is not None:
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_from_source)
    else:
        loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP: no config file to reload")
    await gateway.start()
    assert gateway.master is not None
    await gateway.master.watch(signals.graceful)
    await gateway.stop(signals.immediate)
    return 0


class _Master:
    """Spawns and supervises N data-plane workers sharing the listening port, and keeps
    them fed over ``control.bus``: endpoint state, health and reloaded configs."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.mp = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.started: dict[int, float] = {}  # worker pid -> when it was spawned
        # Limiter state every worker shares, so limits hold across workers (sharedmem).
        self.shared = SharedTables(gateway.config.traffic, self.mp)
        self.bus = MasterBus(gateway.snapshot, self._on_demand)
        self.bus.managed = managed_upstreams(gateway.config)

    def _on_demand(self, upstream: str) -> None:
        control = self.gateway.control
        if control is not None:
            supervisor = control.orchestrator.supervisors.get(upstream)
            fleet = control.orchestrator.fleets.get(upstream)
            if supervisor is not None:
                supervisor.demand()
            elif fleet is not None:
                fleet.demand()

    def _spawn(self) -> Any:
        ours, theirs = self.mp.Pipe(duplex=True)
        # The running config, not the file: a replaced worker runs what its peers run.
        data = self.gateway.config.model_dump(mode="json")
        proc = self.mp.Process(
            target=_worker_entry, args=(data, None, theirs, self.shared), daemon=False
        )
        with self.shared.seeded():
            proc.start()
        theirs.close()
        assert proc.pid is not None
        self.started[proc.pid] = time.monotonic()
        self.bus.add(proc.pid, ours)
        for message in self.gateway.tls_pending.values():
            self.bus.publish(message)  # idempotent for the workers that have it
        return proc

    def signal_workers(self, sig: int) -> None:
        for proc in self.procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def send_config(self, config: Config) -> None:
        self.bus.set_managed(managed_upstreams(config))
        self.bus.publish(("config", config.model_dump(mode="json")))

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.gateway.config.server.workers)]
        log.info("master %d started %d workers", os.getpid(), len(self.procs))

    async def watch(self, stop: asyncio.Event) -> None:
        """Publish endpoint changes and replace dead workers until ``stop`` is set."""
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
                self.shared.clear_counts()  # it died holding in-flight counts
                if time.monotonic() - self.started.pop(proc.pid, 0.0) < WORKER_MIN_UPTIME:
                    await asyncio.sleep(WORKER_MIN_UPTIME)  # crashing at start: do not spin
                if not stop.is_set():
                    self.procs[i] = self._spawn()

    async def stop(self, immediate: asyncio.Event) -> None:
        self.signal_workers(signal.SIGTERM)
        await wait_drained(
            lambda: sum(p.is_alive() for p in self.procs),
            self.gateway.config.server.shutdown_grace + 5,
            immediate,
            "worker(s)",
        )
        if immediate.is_set():  # they got a second SIGTERM: a moment to take it
            await wait_drained(lambda: sum(p.is_alive() for p in self.procs), 2.0, asyncio.Event())
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(1)
        self.bus.close()
        self.shared.close()
