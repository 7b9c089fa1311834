"""Load-shedding decisions: counts in, ADMIT/HOLD/SHED out."""

from __future__ import annotations

import pytest

from portico.policy.admission import (
    ADMIT,
    HOLD,
    P95_EVERY,
    P95_MIN_SAMPLES,
    P95_WINDOW,
    SHED,
    LatencyWindow,
    ShedRule,
    admit,
)

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


SLO = ShedRule(max_in_flight=4, hold=1.0, low_share=0.5, max_p95=0.1)


@pytest.mark.parametrize(
    ("in_flight", "endpoints", "p95", "expected"),
    [
        (3, 1, 0.05, ADMIT),  # under the objective: the whole capacity
        (3, 1, None, ADMIT),  # too few responses to judge: the whole capacity
        (2, 1, 0.5, SHED),  # over it: half the capacity
        (1, 1, 0.5, ADMIT),
        (1, 1, 0.1, ADMIT),  # at the objective is not over it
        (3, 1, 0.1, ADMIT),
        (0, 1, 9.9, ADMIT),  # never below one request per endpoint: the p95 can recover
        (1, 1, 9.9, ADMIT),  # (4 // 2 = 2)
        (2, 2, 9.9, ADMIT),  # two endpoints: 8 // 2 = 4
        (4, 2, 9.9, SHED),
    ],
)
def test_admit_with_a_latency_objective(
    in_flight: int, endpoints: int, p95: float | None, expected: int
) -> None:
    assert admit(SLO, in_flight, endpoints, 0, 0, 0.0, p95) == expected


def test_an_objective_is_ignored_without_one_in_the_rule() -> None:
    assert admit(RULE, 3, 1, 0, 0, 0.0, 9.9) == ADMIT


def test_latency_window_p95_follows_the_last_responses() -> None:
    w = LatencyWindow()
    for _ in range(P95_MIN_SAMPLES - 1):
        w.add(1.0)
    assert w.p95() is None  # too few to say anything
    w.add(1.0)
    assert w.p95() == 1.0
    for i in range(P95_WINDOW):  # a whole window of fast answers, one slow outlier among them
        w.add(0.5 if i == 0 else 0.01)
    assert w.p95() == 0.01  # one slow answer in fifty is not the 95th percentile
    for _ in range(P95_EVERY - 1):  # 9 slow in 50: the p95 is not recomputed yet
        w.add(0.3)
    assert w.p95() == 0.01
    w.add(0.3)  # the tenth new response: recomputed, and 10 in 50 are slow
    assert w.p95() == 0.3
