"""Load-shedding decisions: counts in, ADMIT/HOLD/SHED out."""

from __future__ import annotations

import pytest

from portico.policy.admission import ADMIT, HOLD, SHED, ShedRule, admit

RULE = ShedRule(max_in_flight=4, hold=1.0, low_share=0.5)


@pytest.mark.parametrize(
    ("in_flight", "endpoints", "starting", "priority", "waited", "expected"),
    [
        (3, 1, 0, 0, 0.0, ADMIT),  # room
        (4, 1, 0, 0, 0.0, SHED),  # full, nothing arriving: shed at once
        (4, 1, 1, 0, 0.0, HOLD),  # full, an instance is starting: hold
        (4, 1, 1, 0, 0.5, HOLD),
        (4, 1, 1, 0, 1.0, SHED),  # held long enough
        (4, 2, 1, 0, 0.5, ADMIT),  # the new instance is ready: room again
        (2, 1, 0, -1, 0.0, SHED),  # low priority gets half the capacity
        (1, 1, 1, -1, 0.0, ADMIT),
        (2, 1, 1, -1, 0.0, SHED),  # and is never held
        (4, 1, 0, 1, 0.0, HOLD),  # high priority waits even when nothing is arriving
        (9, 1, 0, 1, 1.0, ADMIT),  # and is never shed
        (0, 0, 1, 0, 0.0, ADMIT),  # no endpoint at all: the proxy's cold start decides
        (0, 0, 0, 0, 0.0, ADMIT),
    ],
)
def test_admit(
    in_flight: int, endpoints: int, starting: int, priority: int, waited: float, expected: int
) -> None:
    assert admit(RULE, in_flight, endpoints, starting, priority, waited) == expected
