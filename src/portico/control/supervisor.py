"""The supervisor: keeps an app's instances running, ready and in the upstream's endpoints.

Theory of operation. ``desired`` is the number of instances the app should have (set by the
autoscaler, a cold start or the config). A reconcile loop compares it with the instances that
count (starting or ready) and starts or drains one instance per step:

* start: the provider starts the command on a free port; the instance gets traffic only once
  its readiness probe (``ready_path``) passes, when its endpoint joins the upstream;
* crash: an instance that exits on its own leaves the endpoints at once and is replaced after
  a back-off that doubles per crash in a row (``backoff_initial`` .. ``backoff_max``); after
  ``crash_loop_after`` crashes in a row the app is reported as crash-looping and restarts
  slow to ``backoff_max`` instead of hammering;
* drain: an instance leaving (scale-down, rolling restart, shutdown) is marked draining (no
  new requests), gets up to ``drain_timeout`` for in-flight requests to finish, and is then
  stopped: SIGTERM, and SIGKILL after ``stop_timeout``;
* adopt: once, before the loop, a provider whose instances outlive Portico (containers) is
  asked for the ones an earlier Portico left running; they go through the readiness gate
  like new ones, and numbering continues after them. On shutdown, an app that keeps its
  instances (``docker.keep``) leaves them running for the next Portico to adopt.

The data plane sees none of this: it reads ``Service.endpoints`` and ``Endpoint.draining``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
from collections.abc import Callable

from portico.config.model import App, HealthCheck
from portico.control.appcheck import cause, not_listening
from portico.control.draining import wait_drained
from portico.control.prober import check_once
from portico.control.providers.base import Adopting, Instance, Provider
from portico.policy.health import parse_statuses
from portico.runtime import membership
from portico.runtime.endpoint import Endpoint
from portico.runtime.events import EventLog
from portico.runtime.snapshot import Service

log = logging.getLogger("portico.app")

# An instance that dies within this many seconds of becoming ready counts as a crash in a row
# (the back-off keeps growing); one that ran longer resets the count.
STABLE_AFTER = 10.0
# How often the reconcile loop looks when nothing wakes it.
RECONCILE_EVERY = 0.25


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"


class Managed:
    """One instance as the supervisor tracks it."""

    __slots__ = ("endpoint", "instance", "ready_at", "started_at", "state", "task")

    def __init__(self, instance: Instance, started_at: float) -> None:
        self.instance = instance
        self.state = State.STARTING
        self.started_at = started_at
        self.ready_at: float | None = None
        self.endpoint: Endpoint | None = None
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Managed {self.instance.id} {self.state.value}>"


class Supervisor:
    def __init__(
        self,
        name: str,
        spec: App,
        provider: Provider,
        service_of: Callable[[], Service],
        events: EventLog,
    ) -> None:
        self.name = name
        self.spec = spec
        self.provider = provider
        self.service_of = service_of
        self.events = events
        self.desired = spec.min
        self.instances: list[Managed] = []
        self.crashes_in_a_row = 0
        self.crash_loop = False
        self._next_start = 0.0
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.drain_settle = 0.0  # see control.draining.wait_drained
        self._surge = 0  # extra instances allowed while a rolling restart overlaps old and new
        self._background: set[asyncio.Task[None]] = set()
        self._ready_check = HealthCheck(
            path=spec.ready_path, timeout=min(2.0, spec.ready_timeout), expect_status="200-399"
        )
        self._statuses = parse_statuses("200-399")

    # --- what others call ---------------------------------------------------------------

    def start(self) -> None:
        service = self.service_of()
        service.demand = self.demand
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"app {self.name}")

    def set_desired(self, n: int) -> None:
        n = max(self.spec.min, min(self.spec.max, n))
        if n != self.desired:
            self.desired = n
            self._wake.set()

    def demand(self) -> None:
        """A request found no instance (min = 0): start one now."""
        if self.desired == 0:
            self.events.add(self.name, "scale", f"scale {self.name} 0 -> 1: cold start")
            log.info("scale %s 0 -> 1: cold start on the first request", self.name)
            self.desired = 1
        self._wake.set()

    @property
    def ready(self) -> list[Managed]:
        return [m for m in self.instances if m.state is State.READY]

    @property
    def counted(self) -> list[Managed]:
        """Instances that count towards ``desired``: starting or ready."""
        return [m for m in self.instances if m.state in (State.STARTING, State.READY)]

    # --- the Fleet seam (control.fleet): what the autoscaler reads -----------------------

    def ready_count(self) -> int:
        return len(self.ready)

    def counted_count(self) -> int:
        return len(self.counted)

    def cpu_percent(self) -> float | None:
        ready = self.ready
        return sum(m.instance.cpu_percent() for m in ready) / max(1, len(ready))

    async def rolling_restart(self) -> None:
        """Replace every instance one by one: start a new one, wait until ready, drain the old."""
        old = [m for m in self.instances if m.state is State.READY]
        self.events.add(self.name, "restart", f"rolling restart of {len(old)} instance(s)")
        log.info("rolling restart of %s: %d instance(s)", self.name, len(old))
        self._surge = 1
        try:
            for managed in old:
                if self._stopping or managed not in self.instances:
                    continue
                fresh = await self._start_one()
                if fresh is None or not await self._wait_ready(fresh):
                    log.warning("rolling restart of %s stopped: no new instance came up", self.name)
                    return
                await self._drain_and_stop(managed, "rolling restart")
        finally:
            self._surge = 0
        self.events.add(self.name, "restart", "rolling restart done")

    async def stop(self) -> None:
        """Drain and stop every instance (Portico is shutting down), or, for an app that
        keeps its instances, only take them out of the endpoints."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.spec.keeps_instances:
            for managed in list(self.instances):
                if managed.state in (State.STARTING, State.READY):
                    self._leave_running(managed)
        await asyncio.gather(
            *(self._drain_and_stop(m, "shutdown") for m in list(self.instances)),
            return_exceptions=True,
        )
        self._wake_waiters()

    # --- the reconcile loop -------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(self.provider, Adopting):
            await self._adopt(self.provider, loop.time())
        while not self._stopping:
            self._reap(loop.time())
            counted = self.counted
            # Load shedding holds requests only while capacity is on its way.
            self.service_of().starting = len(counted) - len(self.ready)
            if len(counted) < self.desired:
                if loop.time() >= self._next_start:
                    await self._start_one()
                    continue
            elif len(counted) > self.desired + self._surge:
                victim = self._victim(counted)
                victim.state = State.DRAINING  # now, so the next pass does not pick it again
                task = loop.create_task(self._drain_and_stop(victim, "scale down"))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                continue
            self._wake.clear()
            delay = RECONCILE_EVERY
            if len(counted) < self.desired:
                delay = max(0.01, min(delay, self._next_start - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _adopt(self, provider: Adopting, now: float) -> None:
        try:
            found = await provider.existing(self.name, self.spec)
        except OSError as exc:
            message = f"{self.name}: could not look for instances to adopt: {exc}"
            self.events.add(self.name, "crash", message)
            log.error(message)
            return
        if not found:
            return
        loop = asyncio.get_running_loop()
        for instance in found:
            managed = Managed(instance, now)
            self.instances.append(managed)
            managed.task = loop.create_task(self._readiness(managed))
            self.events.add(self.name, "adopt", f"{instance.id} adopted on port {instance.port}")
        # New ids continue after the adopted ones, so none is ever given twice.
        numbers = [int(n) for i in found if (n := i.id.rpartition("-")[2]).isdigit()]
        self._ids = itertools.count(max(numbers, default=0) + 1)
        # The fleet an earlier Portico (or its autoscaler) chose is kept, within bounds.
        self.desired = max(self.spec.min, min(self.spec.max, max(self.desired, len(found))))
        log.info("%s: adopted %d running instance(s)", self.name, len(found))

    def _leave_running(self, managed: Managed) -> None:
        if managed.task is not None:
            managed.task.cancel()
        self._remove_endpoint(managed)
        self.instances.remove(managed)
        self.events.add(self.name, "stop", f"{managed.instance.id} left running (keep)")
        log.info("%s left running for the next Portico to adopt (keep)", managed.instance.id)

    def _victim(self, counted: list[Managed]) -> Managed:
        # A starting instance has no traffic yet: cheapest to drop. Otherwise the newest.
        starting = [m for m in counted if m.state is State.STARTING]
        if starting:
            return starting[-1]
        return max(counted, key=lambda m: m.started_at)

    def _reap(self, now: float) -> None:
        for managed in list(self.instances):
            if managed.instance.alive() or managed.state in (State.DRAINING, State.STOPPING):
                continue
            code = managed.instance.exit_code()
            what = f"exited with {code} while {managed.state.value}"
            if last := cause(getattr(managed.instance, "tail", ())):
                what += f" ({last})"
            self._record_crash(managed, now, what)
            # The leader is gone but what it started may not be (gunicorn workers, a shell's
            # child): they would keep running, and serving, outside Portico's view.
            task = asyncio.get_running_loop().create_task(
                self.provider.stop(managed.instance, self.spec.stop_timeout)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _record_crash(self, managed: Managed, now: float, what: str) -> None:
        if managed in self.instances:
            self.instances.remove(managed)
        self._remove_endpoint(managed)
        if managed.task is not None and managed.task is not asyncio.current_task():
            managed.task.cancel()
        stable = managed.ready_at is not None and now - managed.ready_at >= STABLE_AFTER
        self.crashes_in_a_row = 1 if stable else self.crashes_in_a_row + 1
        backoff = min(
            self.spec.backoff_max,
            self.spec.backoff_initial * 2 ** (self.crashes_in_a_row - 1),
        )
        if self.crashes_in_a_row >= self.spec.crash_loop_after:
            backoff = self.spec.backoff_max
            # Clients told why they get 503 (a short header, control.appcheck names causes).
            self.service_of().declare_unavailable(f"{self.name} is crash-looping")
            if not self.crash_loop:
                self.crash_loop = True
                message = (
                    f"{self.name} is crash-looping: {self.crashes_in_a_row} crashes in a row,"
                    f" last: {what}; retrying every {backoff:g}s"
                )
                self.events.add(self.name, "crash_loop", message)
                log.error(message)
        self._next_start = now + backoff
        message = f"{managed.instance.id} {what}; restart in {backoff:g}s"
        self.events.add(self.name, "crash", message)
        log.warning(message)
        self._wake_waiters_if_none()
        self._wake.set()

    async def _start_one(self) -> Managed | None:
        loop = asyncio.get_running_loop()
        instance_id = f"{self.name}-{next(self._ids)}"
        try:
            instance = await self.provider.start(self.name, self.spec, instance_id)
        except OSError as exc:
            self.crashes_in_a_row += 1
            self._next_start = loop.time() + min(
                self.spec.backoff_max,
                self.spec.backoff_initial * 2 ** (self.crashes_in_a_row - 1),
            )
            message = f"{instance_id} could not start: {exc}"
            self.events.add(self.name, "crash", message)
            log.error(message)
            self._wake_waiters_if_none()
            return None
        managed = Managed(instance, loop.time())
        self.instances.append(managed)
        self.service_of().starting += 1
        self.events.add(self.name, "start", f"{instance_id} started on port {instance.port}")
        log.info("%s started on 127.0.0.1:%d", instance_id, instance.port)
        managed.task = loop.create_task(self._readiness(managed))
        return managed

    async def _readiness(self, managed: Managed) -> None:
        """Probe until ready (then add the endpoint) or until ``ready_timeout`` (then stop)."""
        loop = asyncio.get_running_loop()
        deadline = managed.started_at + self.spec.ready_timeout
        # Halfway: say why it is not ready yet if nothing listens on its port.
        diagnose_at = managed.started_at + self.spec.ready_timeout / 2
        instance = managed.instance
        reason = "not probed"
        diagnosis: str | None = None
        while loop.time() < deadline and instance.alive():
            result = await check_once(
                instance.host, instance.port, self._ready_check, self._statuses
            )
            if result.ok:
                self._mark_ready(managed, loop.time())
                return
            reason = result.reason
            if diagnosis is None and loop.time() >= diagnose_at:
                diagnosis = self._diagnose(instance) or ""
                if diagnosis:
                    log.warning("%s is %s", instance.id, diagnosis)
            await asyncio.sleep(self.spec.ready_interval)
        if instance.alive() and managed.state is State.STARTING:
            diagnosis = self._diagnose(instance) or diagnosis
            managed.state = State.STOPPING
            await self.provider.stop(instance, self.spec.stop_timeout)
            what = f"was not ready after {self.spec.ready_timeout:g}s ({reason})"
            if diagnosis:
                what = f"was not ready after {self.spec.ready_timeout:g}s: {diagnosis}"
            self._record_crash(managed, loop.time(), what)

    @staticmethod
    def _diagnose(instance: Instance) -> str | None:
        """Why a live local instance is not ready, when its ports tell (see appcheck)."""
        pid = getattr(instance, "pid", None)
        if not isinstance(pid, int):
            return None  # a container: its ports are not ours to inspect
        return not_listening(pid, instance.port)

    def _mark_ready(self, managed: Managed, now: float) -> None:
        if managed.state is not State.STARTING:
            return
        managed.state = State.READY
        managed.ready_at = now
        instance = managed.instance
        ep = Endpoint(instance.host, instance.port)
        managed.endpoint = ep
        membership.join(self.service_of(), ep, now)
        self.service_of().unavailable = None
        self.service_of().starting = max(0, self.service_of().starting - 1)
        if self.crash_loop:
            self.crash_loop = False
            self.events.add(self.name, "ready", f"{self.name} recovered from its crash loop")
        self.events.add(self.name, "ready", f"{instance.id} ready on port {instance.port}")
        log.info("%s ready: taking traffic", instance.id)
        self._wake.set()

    async def _wait_ready(self, managed: Managed) -> bool:
        while managed.state is State.STARTING and managed in self.instances:
            await asyncio.sleep(0.02)
        return managed.state is State.READY

    async def _drain_and_stop(self, managed: Managed, why: str) -> None:
        if managed.state is State.STOPPING:
            return
        managed.state = State.DRAINING
        if managed.task is not None:
            managed.task.cancel()
        ep = managed.endpoint
        instance = managed.instance
        if ep is not None:
            membership.drain(ep)
            self.events.add(self.name, "drain", f"{instance.id} draining ({why})")
            log.info("%s draining (%s)", instance.id, why)
            await wait_drained(ep, self.spec.drain_timeout, self.drain_settle)
            self._remove_endpoint(managed)
        managed.state = State.STOPPING
        await self.provider.stop(instance, self.spec.stop_timeout)
        if managed in self.instances:
            self.instances.remove(managed)
        self.events.add(self.name, "stop", f"{instance.id} stopped ({why})")
        log.info("%s stopped (%s)", instance.id, why)
        self._wake.set()

    def _remove_endpoint(self, managed: Managed) -> None:
        ep = managed.endpoint
        if ep is None:
            return
        managed.endpoint = None
        membership.leave(self.service_of(), ep)

    # --- requests held for a cold start -------------------------------------------------

    def _wake_waiters(self) -> None:
        membership.wake_waiters(self.service_of())

    def _wake_waiters_if_none(self) -> None:
        """A start failed and nothing is ready: let held requests fail now (503), not later."""
        if not self.ready:
            self._wake_waiters()
