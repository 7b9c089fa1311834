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


def admit(
    rule: ShedRule,
    in_flight: int,
    endpoints: int,
    starting: int,
    priority: int,
    waited: float,
) -> int:
    """ADMIT, HOLD or SHED one request (see the module's description)."""
    if endpoints == 0:
        # No instance at all is the proxy's case: a cold start (min = 0) or a 503 of its own.
        return ADMIT
    capacity = rule.max_in_flight * endpoints
    if priority < 0:
        capacity = int(capacity * rule.low_share)
    if in_flight < capacity:
        return ADMIT
    if priority < 0:
        return SHED
    if waited < rule.hold and (starting > 0 or priority > 0):
        return HOLD
    return ADMIT if priority > 0 else SHED
