"""The autoscaler: sample an app's load, ask ``policy.scaling`` what to do, tell the supervisor.

Signals, per ready instance:
* ``in_flight``: requests in progress, averaged over the samples of one interval (the
  default, as Knative's concurrency target);
* ``rps``: requests completed per second;
* ``p95_latency``: the 95th percentile response time (seconds) of the interval's requests;
* ``cpu``: CPU % of the instance's process tree (psutil).

With ``min = 0``, an app that has had no request for ``idle_timeout`` seconds scales to zero;
the next request starts an instance (see ``Supervisor.demand``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from portico.config.model import Autoscale
from portico.control.fleet import Fleet
from portico.policy.scaling import Decision, Scaler, ScalingRule
from portico.runtime.events import EventLog
from portico.runtime.snapshot import Service

log = logging.getLogger("portico.autoscaler")

# Samples taken per decision interval for the averaged signals (in-flight).
SAMPLES_PER_INTERVAL = 5


def p95(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


class Autoscaler:
    def __init__(
        self,
        supervisor: Fleet,
        rule: Autoscale,
        service_of: Callable[[], Service],
        events: EventLog,
    ) -> None:
        spec = supervisor.spec
        self.supervisor = supervisor
        self.rule = rule
        self.service_of = service_of
        self.events = events
        self.scaler = Scaler(
            ScalingRule(
                # Zero only through idle_timeout (see _step): a scaler free to recommend zero
                # stops a cold-started instance while its first request is still held.
                min=max(1, spec.min),
                max=spec.max,
                target=rule.target,
                metric=rule.metric,
                scale_up_window=rule.scale_up_window,
                scale_down_window=rule.scale_down_window,
                max_step=rule.max_step,
                cooldown=rule.cooldown,
            )
        )
        self.decisions: list[Decision] = []
        # Several Portico replicas: only the leader applies decisions (control.leader); the
        # others keep sampling and feeding the scaler, so a new leader has a full window.
        self.leading: Callable[[], bool] = lambda: True
        self._task: asyncio.Task[None] | None = None
        self._last_requests = 0
        self._last_busy: float | None = None
        self._started = 0.0
        # Until this loop time the count is an operator's (admin API scale with a hold).
        self.hold_until: float | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"autoscaler {self.supervisor.name}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_busy = loop.time()
        self._started = loop.time()
        self._last_requests = self._requests()
        while True:
            observed = await self._sample(loop)
            if observed is not None:
                self._step(observed, loop.time(), act=self.leading())

    def _requests(self) -> int:
        return sum(ep.requests for ep in self.service_of().endpoints)

    async def _sample(self, loop: asyncio.AbstractEventLoop) -> float | None:
        """One interval's value of the metric, per ready instance."""
        interval = self.rule.interval
        metric = self.rule.metric
        in_flight_sum = 0.0
        held = 0  # requests waiting for a cold start: demand, though at no endpoint yet
        for _ in range(SAMPLES_PER_INTERVAL):
            await asyncio.sleep(interval / SAMPLES_PER_INTERVAL)
            service = self.service_of()
            in_flight_sum += sum(ep.in_flight for ep in service.endpoints)
            held += len(service.waiters)
        n = max(1, self.supervisor.ready_count())
        requests = self._requests()
        done = max(0, requests - self._last_requests)
        self._last_requests = requests
        if done or in_flight_sum or held:
            self._last_busy = loop.time()
        if metric == "in_flight":
            return in_flight_sum / SAMPLES_PER_INTERVAL / n
        if metric == "rps":
            return done / interval / n
        if metric == "p95_latency":
            samples = self.service_of().latencies
            if samples is None:
                return 0.0
            values = list(samples)
            samples.clear()
            return p95(values)
        return self.supervisor.cpu_percent()  # None: no CPU signal (no metrics API)

    def _step(self, observed: float, now: float, act: bool = True) -> None:
        """Decide from one sample; apply only when ``act`` (this Portico leads). A follower
        still feeds the scaler, so a new leader decides from a full window, not one sample."""
        sup = self.supervisor
        if self.hold_until is not None and now < self.hold_until:
            return
        current = sup.counted_count()
        spec = sup.spec
        if (
            spec.min == 0
            and current > 0
            and self._last_busy is not None
            and now - self._last_busy >= self.rule.idle_timeout
            and act
        ):
            reason = f"idle for {now - self._last_busy:.0f}s >= {self.rule.idle_timeout:g}s"
            self._apply(Decision(current, 0, 0.0, reason))
            return
        if current == 0:
            return  # scaled to zero: only a request (cold start) brings an instance back
        decision = self.scaler.decide(current, observed, now)
        if decision is None or not act:
            return
        if (
            decision.desired < decision.current
            and now - self._started < self.rule.scale_down_window
        ):
            # Not one scale-down window of samples yet: an autoscaler that has just started
            # (a Portico restart, adopting a Deployment or containers already scaled up for
            # a load) would otherwise scale down on its first quiet sample.
            return
        self._apply(decision)

    def _apply(self, decision: Decision) -> None:
        name = self.supervisor.name
        message = f"scale {name} {decision.current} -> {decision.desired}: {decision.reason}"
        log.info(message)
        self.events.add(name, "scale", message)
        self.decisions.append(decision)
        del self.decisions[:-100]
        self.supervisor.set_desired(decision.desired)
