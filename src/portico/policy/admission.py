"""Load shedding: admit, hold or shed a request for a saturated upstream, knowing the fleet.

An upstream is saturated when its requests in flight reach ``max_in_flight`` per available
endpoint. What happens then depends on the route's priority and on the fleet:

* capacity is arriving (the supervisor is starting instances): a request of normal or high
  priority is *held*, re-asked every moment, for up to ``hold`` seconds; it is admitted as
  soon as there is room (a new instance became ready, or a request finished);
* nothing is arriving (at max, or no autoscaling): holding only adds latency to a queue that
  will not shrink, so a normal request is shed at once (503 with Retry-After);
* high priority (> 0) is never shed: once ``hold`` has passed it is admitted anyway;
* low priority (< 0) may use only ``low_share`` of the capacity and is never held, so the
  last of the capacity stays for the others.

With a latency objective (``max_p95``), an upstream whose recent p95 response time is above
it is saturated earlier: its capacity is halved (never below one request per endpoint, so
responses keep coming and the p95 can recover). Shedding then ends by itself when the p95
falls back under the objective, because new instances took load or the backend recovered.

With no available endpoint at all the request goes on to the proxy, whose cold start (or
503) handles it. Pure: the caller passes the counts and how long the request has waited.
"""

from __future__ import annotations

from dataclasses import dataclass

ADMIT, HOLD, SHED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ShedRule:
    max_in_flight: int  # per available endpoint
    hold: float = 1.0  # longest wait for room, seconds
    low_share: float = 0.8  # share of capacity priority < 0 may use
    retry_after: int = 1  # seconds, in the 503's Retry-After
    max_p95: float | None = None  # latency objective, seconds


# Responses a p95 is taken over: enough that one slow answer is not the 95th percentile, few
# enough that the signal follows a change within a second or two of traffic.
P95_WINDOW = 50
# Fewer responses than this say nothing yet: the objective is not judged.
P95_MIN_SAMPLES = 20
# The p95 is recomputed after this many new responses, not on every request.
P95_EVERY = 10


class LatencyWindow:
    """The last ``P95_WINDOW`` response times of one upstream (in one worker) and their p95."""

    __slots__ = ("_count", "_fresh", "_next", "_p95", "_samples")

    def __init__(self) -> None:
        self._samples = [0.0] * P95_WINDOW
        self._next = 0
        self._count = 0
        self._fresh = 0
        self._p95: float | None = None

    def add(self, seconds: float) -> None:
        self._samples[self._next] = seconds
        self._next = (self._next + 1) % P95_WINDOW
        if self._count < P95_WINDOW:
            self._count += 1
        self._fresh += 1

    def p95(self) -> float | None:
        """The 95th percentile of the window, or None while it holds too few responses."""
        if self._fresh >= P95_EVERY or (self._p95 is None and self._fresh):
            self._fresh = 0
            if self._count >= P95_MIN_SAMPLES:
                ordered = sorted(self._samples[: self._count])
                self._p95 = ordered[min(self._count - 1, int(0.95 * self._count))]
        return self._p95


def admit(
    rule: ShedRule,
    in_flight: int,
    endpoints: int,
    starting: int,
    priority: int,
    waited: float,
    p95: float | None = None,
) -> int:
    """ADMIT, HOLD or SHED one request (see the module's description). ``p95``: the
    upstream's recent p95 response time, when the rule has an objective."""
    if endpoints == 0:
        # No instance at all is the proxy's case: a cold start (min = 0) or a 503 of its own.
        return ADMIT
    capacity = rule.max_in_flight * endpoints
    if rule.max_p95 is not None and p95 is not None and p95 > rule.max_p95:
        capacity = max(endpoints, capacity // 2)
    if priority < 0:
        capacity = int(capacity * rule.low_share)
    if in_flight < capacity:
        return ADMIT
    if priority < 0:
        return SHED
    if waited < rule.hold and (starting > 0 or priority > 0):
        return HOLD
    return ADMIT if priority > 0 else SHED
