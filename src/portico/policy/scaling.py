"""Autoscaling decisions: target tracking with stabilisation windows, step limits, cool-down.

Theory of operation (Kubernetes' HPA, Knative's KPA). Each sample gives ``observed``, the
metric's value per ready instance. The raw recommendation is

    desired = ceil(current * observed / target)

clamped to [min, max]. Recommendations are remembered for the longer of the two windows:
a scale-up goes to the *lowest* recommendation of the last ``scale_up_window`` seconds and a
scale-down to the *highest* of the last ``scale_down_window`` seconds, so a short spike or a
short lull does not move the fleet. One decision moves at most ``max_step`` instances, and
none is made within ``cooldown`` seconds of the previous one. Pure: ``now`` is an argument.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

METRIC_LABELS = {
    "in_flight": "in-flight/instance",
    "rps": "req/s/instance",
    "p95_latency": "p95 latency s",
    "cpu": "CPU %/instance",
}


@dataclass(frozen=True, slots=True)
class ScalingRule:
    min: int
    max: int
    target: float
    metric: str = "in_flight"
    scale_up_window: float = 0.0
    scale_down_window: float = 30.0
    max_step: int = 4
    cooldown: float = 5.0


@dataclass(frozen=True, slots=True)
class Decision:
    current: int
    desired: int
    observed: float
    reason: str


class Scaler:
    """Remembers recent recommendations and the last action; decides one step at a time."""

    __slots__ = ("_history", "_last_action", "rule")

    def __init__(self, rule: ScalingRule) -> None:
        self.rule = rule
        self._history: deque[tuple[float, int]] = deque()
        self._last_action: float | None = None

    def raw(self, current: int, observed: float) -> int:
        rule = self.rule
        if current == 0:
            wanted = 1 if observed > 0 else 0
        else:
            wanted = math.ceil(current * observed / rule.target - 1e-9)
        return max(rule.min, min(rule.max, wanted))

    def decide(self, current: int, observed: float, now: float) -> Decision | None:
        rule = self.rule
        raw = self.raw(current, observed)
        history = self._history
        history.append((now, raw))
        horizon = max(rule.scale_up_window, rule.scale_down_window)
        while history and history[0][0] < now - horizon:
            history.popleft()
        if raw > current:
            window = [r for t, r in history if t >= now - rule.scale_up_window]
            desired = max(current, min(window))
        elif raw < current:
            window = [r for t, r in history if t >= now - rule.scale_down_window]
            desired = min(current, max(window))
        else:
            desired = current
        desired = max(current - rule.max_step, min(current + rule.max_step, desired))
        desired = max(rule.min, min(rule.max, desired))
        if desired == current:
            return None
        if self._last_action is not None and now - self._last_action < rule.cooldown:
            return None
        self._last_action = now
        label = METRIC_LABELS.get(rule.metric, rule.metric)
        if current < rule.min:
            reason = f"{current} instance(s) is below min {rule.min}"
        elif current > rule.max:
            reason = f"{current} instance(s) is above max {rule.max}"
        else:
            relation = ">" if desired > current else "<"
            reason = f"{label} {observed:.3g} {relation} target {rule.target:g}"
        return Decision(current, desired, observed, reason)
