"""The channel between the master and its workers when ``server.workers > 1``.

The control plane (health checks, supervisors, discovery) runs once, in the master, against
the master's own copy of the snapshot. Workers only serve traffic. A duplex pipe per worker
carries small pickled tuples:

master -> worker
    ``("health", upstream, label, healthy)``: an active-check transition.
    ``("endpoints", upstream, [(host, port, draining), ...])``: the endpoint set of an upstream
    the master manages (apps, discovery), sent whenever it changes.
    ``("pass", upstream, label)``: an active check passed; ends the endpoint's outlier
    ejection in a worker that ejected it (ejections are per worker, like their traffic).
    ``("endpoint", upstream, label, draining, weight)``: an operator drained, undrained or
    re-weighted an endpoint (admin API); ``None`` leaves a value as it is.
    ``("config", data)``: a reload. The master validated the new config, filled in its
    secrets and compiled it; ``data`` is its JSON dump, which the worker validates back into
    a ``Config`` (it cannot fail) and compiles against its own snapshot.
worker -> master
    ``("stats", {upstream: {label: (in_flight, requests, ejected)}}, {upstream: [latency]})``:
    every ``STATS_EVERY`` seconds, so the master's draining and autoscaling (and the admin
    API) see the load of all workers (summed); latencies for managed upstreams only.
    ``("demand", upstream)``: a request found no instance (scale from zero).
    ``("metrics", delta, gauges)``: when metrics are on, every ``STATS_EVERY`` seconds: the
    request counters since the last report (the master adds them up) and the worker's
    current gauges (``dataplane.metrics``).

Endpoints are matched by address on both sides, so a worker's in-flight counters survive
every change of the set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from portico.control.health import apply_state, end_ejection
from portico.dataplane.metrics import MetricTotals
from portico.runtime import membership
from portico.runtime.snapshot import Snapshot

log = logging.getLogger("portico.bus")

# How often workers report load for managed upstreams, and the master checks for endpoint
# changes to publish: fast enough for draining and autoscaling, cheap at any traffic.
STATS_EVERY = 0.1

def _blocking_again(pipe: Connection) -> None:
    """Undo the O_NONBLOCK that uvloop's ``add_reader`` sets (libuv's poll handles do).

    ``Connection.send`` and ``recv`` frame messages with blocking writes and reads: on a
    non-blocking pipe a message larger than the pipe buffer (a reloaded config easily is)
    fails half-written, and the framing of everything after it is lost. Blocking is safe
    here: a reader only runs when the pipe is readable, and the peer process is always
    reading or about to.
    """
    os.set_blocking(pipe.fileno(), True)


class MasterBus:
    """The master's ends of the pipes; publishes state and folds in workers' reports."""

    def __init__(
        self, snapshot_of: Callable[[], Snapshot], on_demand: Callable[[str], None]
    ) -> None:
        self._snapshot_of = snapshot_of
        self._on_demand = on_demand
        self._pipes: dict[int, Connection] = {}
        self._stats: dict[int, dict[str, dict[str, tuple[int, int, bool]]]] = {}
        self._published: dict[str, list[membership.EndpointRow]] = {}
        self._starting: dict[str, int] = {}
        self._unavailable: dict[str, str | None] = {}
        self.managed: set[str] = set()  # upstreams whose endpoints the master owns
        # (upstream, label) -> workers whose outlier detection ejects it now (admin API).
        self.ejections: dict[tuple[str, str], int] = {}
        self.metrics = MetricTotals()  # the workers' request counters, summed

    def add(self, key: int, pipe: Connection) -> None:
        self._pipes[key] = pipe
        snapshot = self._snapshot_of()
        for name, service in snapshot.services.items():
            if name in self.managed:
                self._send(key, ("endpoints", name, membership.rows(service)))
                if service.starting:
                    self._send(key, ("starting", name, service.starting))
                if service.unavailable:
                    self._send(key, ("unavailable", name, service.unavailable))
            for ep in service.endpoints:
                if not ep.up:
                    self._send(key, ("health", name, ep.label, False))
                # An operator's drain and weight (admin API); managed rows carry draining.
                draining = None if name in self.managed else ep.draining
                self._send(key, ("endpoint", name, ep.label, draining, ep.weight))
        asyncio.get_running_loop().add_reader(pipe.fileno(), self._readable, key)
        _blocking_again(pipe)

    def remove(self, key: int) -> None:
        pipe = self._pipes.pop(key, None)
        self._stats.pop(key, None)
        self.metrics.drop_worker(key)
        if pipe is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(pipe.fileno())
            pipe.close()
        self._fold_stats()

    def set_managed(self, managed: set[str]) -> None:
        """A reload changed which upstreams the master owns; forget what was published for
        the others, so one that comes back is published afresh."""
        self.managed = managed
        for name in list(self._published):
            if name not in managed:
                del self._published[name]

    def publish(self, message: tuple[Any, ...]) -> None:
        for key in list(self._pipes):
            self._send(key, message)

    def publish_endpoint_changes(self) -> None:
        snapshot = self._snapshot_of()
        for name in self.managed:
            service = snapshot.services.get(name)
            if service is None:
                continue
            rows = membership.rows(service)
            if rows != self._published.get(name):
                self._published[name] = rows
                self.publish(("endpoints", name, rows))
            if service.starting != self._starting.get(name, 0):
                # Load shedding in the workers holds requests while instances start.
                self._starting[name] = service.starting
                self.publish(("starting", name, service.starting))
            if service.unavailable != self._unavailable.get(name):
                # Why no instance serves (a crash loop): the workers' 503s say it too.
                self._unavailable[name] = service.unavailable
                self.publish(("unavailable", name, service.unavailable))

    def _send(self, key: int, message: tuple[Any, ...]) -> None:
        try:
            self._pipes[key].send(message)
        except (BrokenPipeError, OSError):
            self.remove(key)  # the worker is gone; the master replaces it

    def _readable(self, key: int) -> None:
        pipe = self._pipes.get(key)
        if pipe is None:
            return
        try:
            while pipe.poll():
                message = pipe.recv()
                if message[0] == "stats":
                    self._stats[key] = message[1]
                    self._add_latencies(message[2])
                    self._fold_stats()
                elif message[0] == "demand":
                    self._on_demand(message[1])
                elif message[0] == "metrics":
                    self.metrics.add(message[1])
                    self.metrics.set_gauges(key, message[2])
        except (EOFError, OSError):
            self.remove(key)

    def _fold_stats(self) -> None:
        """The master's endpoints carry the sum of every worker's counters."""
        snapshot = self._snapshot_of()
        ejections: dict[tuple[str, str], int] = {}
        for name, service in snapshot.services.items():
            for ep in service.endpoints:
                in_flight = requests = ejected = 0
                for stats in self._stats.values():
                    row = stats.get(name, {}).get(ep.label)
                    if row is not None:
                        in_flight += row[0]
                        requests += row[1]
                        ejected += row[2]
                ep.in_flight = in_flight
                ep.requests = max(ep.requests, requests)
                if ejected:
                    ejections[(name, ep.label)] = ejected
        self.ejections = ejections

    def _add_latencies(self, latencies: dict[str, list[float]]) -> None:
        snapshot = self._snapshot_of()
        for name, values in latencies.items():
            service = snapshot.services.get(name)
            if service is not None and service.latencies is not None:
                service.latencies.extend(values)

    def close(self) -> None:
        for key in list(self._pipes):
            self.remove(key)


def follow_master(
    pipe: Connection,
    loop: asyncio.AbstractEventLoop,
    snapshot_of: Callable[[], Snapshot],
    managed: set[str],
    on_config: Callable[[dict[str, Any]], None],
    on_other: Callable[[tuple[Any, ...]], None] | None = None,
    metrics_report: Callable[[], tuple[Any, ...] | None] | None = None,
) -> Callable[[], None]:
    """Worker side: apply what the master sends, report load, forward demand.

    ``managed`` is read on every report, so ``on_config`` may update it in place.
    ``metrics_report`` gives the ``("metrics", ...)`` message to send, or None (metrics off).
    Returns a function that stops the periodic report.
    """

    def send(message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(message)

    def readable() -> None:
        try:
            while pipe.poll():
                message = pipe.recv()
                snapshot = snapshot_of()
                if message[0] == "health":
                    _, upstream, label, healthy = message
                    apply_state(snapshot, upstream, label, healthy, loop.time())
                elif message[0] == "endpoints":
                    service = snapshot.services.get(message[1])
                    if service is not None:
                        membership.sync(service, message[2], loop.time())
                elif message[0] == "pass":
                    end_ejection(snapshot, message[1], message[2], loop.time())
                elif message[0] == "endpoint":
                    service = snapshot.services.get(message[1])
                    if service is not None:
                        membership.steer(service, *message[2:])
                elif message[0] == "config":
                    on_config(message[1])
                elif message[0] == "starting":
                    service = snapshot.services.get(message[1])
                    if service is not None:
                        service.starting = message[2]
                elif message[0] == "unavailable":
                    service = snapshot.services.get(message[1])
                    if service is not None:
                        service.declare_unavailable(message[2])
                elif on_other is not None:
                    on_other(message)  # e.g. ("acme", ...): TLS certificates and challenges
        except (EOFError, OSError):
            # The master is gone; PR_SET_PDEATHSIG stops this worker shortly.
            with contextlib.suppress(Exception):
                loop.remove_reader(pipe.fileno())

    def install_demand() -> None:
        for name in managed:
            service = snapshot_of().services.get(name)
            if service is not None and service.has_app:
                service.demand = lambda name=name: send(("demand", name))

    timer: asyncio.TimerHandle | None = None

    def report() -> None:
        nonlocal timer
        install_demand()  # a reload builds new services; keep them wired
        snapshot = snapshot_of()
        stats: dict[str, dict[str, tuple[int, int, bool]]] = {}
        latencies: dict[str, list[float]] = {}
        for name, service in snapshot.services.items():
            stats[name] = {
                ep.label: (ep.in_flight, ep.requests, ep.ejected) for ep in service.endpoints
            }
            if name in managed and service.latencies:
                latencies[name] = list(service.latencies)
                service.latencies.clear()
        if stats:
            send(("stats", stats, latencies))
        if metrics_report is not None and (message := metrics_report()) is not None:
            send(message)
        timer = loop.call_later(STATS_EVERY, report)

    loop.add_reader(pipe.fileno(), readable)
    _blocking_again(pipe)
    install_demand()
    # Always on: a reload may add a managed upstream. An empty report is a few bytes.
    timer = loop.call_later(STATS_EVERY, report)

    def stop() -> None:
        if timer is not None:
            timer.cancel()

    return stop
