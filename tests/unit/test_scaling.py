"""``policy.scaling.Scaler``: target tracking, stabilisation windows, step limit, cool-down.

Pure: every call passes ``now``, so a "window" here is a sequence of samples at chosen times.
Sample times are multiples of 0.25 s (exact in binary floating point), so a sample is never in
or out of a window by rounding.
"""

from __future__ import annotations

import pytest

from portico.policy.scaling import Decision, Scaler, ScalingRule

STEP = 0.25  # seconds between samples, as the autoscaler's interval


def scaler(
    *,
    min: int = 1,
    max: int = 10,
    target: float = 4.0,
    metric: str = "in_flight",
    scale_up_window: float = 0.0,
    scale_down_window: float = 0.0,
    max_step: int = 100,
    cooldown: float = 0.0,
) -> Scaler:
    return Scaler(
        ScalingRule(
            min=min,
            max=max,
            target=target,
            metric=metric,
            scale_up_window=scale_up_window,
            scale_down_window=scale_down_window,
            max_step=max_step,
            cooldown=cooldown,
        )
    )


def feed(s: Scaler, current: int, samples: list[float], start: float) -> list[Decision | None]:
    """Feed one observed value per STEP from ``start``, applying each decision as the
    autoscaler would (the next sample sees the new count)."""
    out = []
    for i, observed in enumerate(samples):
        decision = s.decide(current, observed, start + i * STEP)
        out.append(decision)
        if decision is not None:
            current = decision.desired
    return out


# --- the formula ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "observed", "target", "desired"),
    [
        (2, 9.5, 4, 5),  # ceil(2 * 9.5 / 4) = ceil(4.75)
        (1, 4.1, 4, 2),  # just over target: one more
        (3, 8.0, 4, 6),  # exactly twice the target: twice the instances
        (4, 1.0, 4, 1),  # a quarter of the target: a quarter of the instances
        (5, 2.5, 4, 4),  # ceil(3.125): rounds up, never below the need
        (2, 0.0, 4, 1),  # no load: down to min
    ],
)
def test_desired_is_ceil_of_current_times_observed_over_target(
    current: int, observed: float, target: float, desired: int
) -> None:
    decision = scaler(target=target).decide(current, observed, now=0.0)
    assert decision is not None
    assert (decision.current, decision.desired, decision.observed) == (current, desired, observed)


@pytest.mark.parametrize(("current", "observed"), [(2, 4.0), (3, 3.5), (1, 0.5)])
def test_no_decision_when_the_formula_gives_the_current_count(
    current: int, observed: float
) -> None:
    assert scaler(target=4.0).decide(current, observed, now=0.0) is None


def test_float_noise_at_exactly_target_does_not_add_an_instance() -> None:
    # 3 * 0.1 / 0.1 is 3.0000000000000004 in floating point; ceil of that would be 4.
    assert 3 * 0.1 / 0.1 > 3
    assert scaler(target=0.1).decide(3, 0.1, now=0.0) is None


def test_clamped_to_max() -> None:
    decision = scaler(max=5).decide(2, 100.0, now=0.0)
    assert decision is not None and decision.desired == 5


def test_clamped_to_min() -> None:
    decision = scaler(min=3).decide(8, 0.0, now=0.0)
    assert decision is not None and decision.desired == 3


def test_at_max_already_no_decision_however_high_the_load() -> None:
    assert scaler(max=5).decide(5, 1000.0, now=0.0) is None


def test_at_min_already_no_decision_without_load() -> None:
    assert scaler(min=2).decide(2, 0.0, now=0.0) is None


def test_raw_from_zero_instances_is_one_with_load_and_zero_without() -> None:
    s = scaler(min=0)
    assert s.raw(0, 3.0) == 1
    assert s.raw(0, 0.0) == 0
    assert scaler(min=2).raw(0, 0.0) == 2


# --- stabilisation windows ------------------------------------------------------------------


def test_short_spike_does_not_scale_up_with_a_scale_up_window() -> None:
    s = scaler(target=1.0, scale_up_window=1.0)
    steady = feed(s, 2, [1.0] * 5, start=0.0)  # 0.0 .. 1.0: at target
    spike = feed(s, 2, [5.0, 5.0, 5.0], start=1.25)  # 1.25 .. 1.75: under the window
    after = feed(s, 2, [1.0] * 4, start=2.0)
    assert steady == [None] * 5
    assert spike == [None] * 3
    assert after == [None] * 4


def test_sustained_load_scales_up_once_it_fills_the_scale_up_window() -> None:
    s = scaler(target=1.0, scale_up_window=1.0)
    feed(s, 2, [1.0] * 5, start=0.0)  # 0.0 .. 1.0 at target
    # From 1.25 on, twice the target. The window [now - 1, now] still holds the last at-target
    # sample (1.0) until now = 2.25.
    decisions = feed(s, 2, [2.0] * 5, start=1.25)  # 1.25 .. 2.25
    assert decisions[:4] == [None] * 4
    last = decisions[4]
    assert last is not None and (last.current, last.desired) == (2, 4)


def test_scale_up_goes_to_the_lowest_recommendation_of_the_window() -> None:
    s = scaler(target=1.0, scale_up_window=0.5)
    assert s.decide(2, 1.0, 0.0) is None  # recommendation 2
    assert s.decide(2, 1.5, 0.25) is None  # recommendation 3, but 2 is in the window
    decision = s.decide(2, 4.0, 0.5)  # recommendation 8; window holds 2 (at 0.0), 3, 8
    assert decision is None
    decision = s.decide(2, 4.0, 0.75)  # window [0.25, 0.75]: 3, 8, 8 -> the lowest is 3
    assert decision is not None and decision.desired == 3


def test_without_a_scale_up_window_a_single_sample_scales_up() -> None:
    s = scaler(target=1.0, scale_up_window=0.0)
    feed(s, 2, [1.0] * 4, start=0.0)
    decision = s.decide(2, 3.0, now=1.0)
    assert decision is not None and decision.desired == 6


def test_short_lull_does_not_scale_down_with_a_scale_down_window() -> None:
    s = scaler(target=1.0, scale_down_window=1.0)
    feed(s, 4, [1.0] * 5, start=0.0)  # 4 instances at target
    lull = feed(s, 4, [0.0, 0.0, 0.0], start=1.25)
    after = feed(s, 4, [1.0] * 4, start=2.0)
    assert lull == [None] * 3
    assert after == [None] * 4


def test_sustained_lull_scales_down_once_it_fills_the_scale_down_window() -> None:
    s = scaler(target=1.0, scale_down_window=1.0)
    feed(s, 4, [1.0] * 5, start=0.0)  # 0.0 .. 1.0 at target
    decisions = feed(s, 4, [0.25] * 5, start=1.25)  # 1.25 .. 2.25: a quarter of the target
    assert decisions[:4] == [None] * 4
    last = decisions[4]
    assert last is not None and (last.current, last.desired) == (4, 1)


def test_scale_down_goes_to_the_highest_recommendation_of_the_window() -> None:
    s = scaler(target=1.0, scale_down_window=0.5)
    assert s.decide(8, 1.0, 0.0) is None  # recommendation 8
    assert s.decide(8, 0.5, 0.25) is None  # 4, but 8 is in the window
    assert s.decide(8, 0.25, 0.5) is None  # 2, and 8 is still in the window (at 0.0)
    decision = s.decide(8, 0.25, 0.75)  # window [0.25, 0.75]: 4, 2, 2 -> the highest is 4
    assert decision is not None and decision.desired == 4


def test_without_a_scale_down_window_a_single_sample_scales_down() -> None:
    s = scaler(target=1.0, scale_down_window=0.0)
    feed(s, 4, [1.0] * 4, start=0.0)
    decision = s.decide(4, 0.5, now=1.0)
    assert decision is not None and decision.desired == 2


def test_up_window_does_not_delay_scale_down_and_down_window_does_not_delay_scale_up() -> None:
    s = scaler(target=1.0, scale_up_window=0.0, scale_down_window=10.0)
    feed(s, 2, [1.0] * 4, start=0.0)
    up = s.decide(2, 2.0, now=1.0)
    assert up is not None and up.desired == 4
    s = scaler(target=1.0, scale_up_window=10.0, scale_down_window=0.0)
    feed(s, 4, [1.0] * 4, start=0.0)
    down = s.decide(4, 0.5, now=1.0)
    assert down is not None and down.desired == 2


# --- step limit and cool-down ---------------------------------------------------------------


def test_max_step_limits_a_scale_up() -> None:
    s = scaler(max=20, target=1.0, max_step=2)
    decisions = feed(s, 1, [10.0, 10.0 / 3, 10.0 / 5], start=0.0)  # each wants 10 in all
    assert [(d.current, d.desired) for d in decisions if d] == [(1, 3), (3, 5), (5, 7)]


def test_max_step_limits_a_scale_down() -> None:
    s = scaler(target=1.0, max_step=3)
    decisions = feed(s, 10, [0.0, 0.0, 0.0], start=0.0)
    assert [(d.current, d.desired) for d in decisions if d] == [(10, 7), (7, 4), (4, 1)]


def test_cooldown_blocks_a_second_action_until_it_has_passed() -> None:
    s = scaler(target=1.0, cooldown=1.0)
    first = s.decide(2, 2.0, now=0.0)
    assert first is not None and first.desired == 4
    assert s.decide(4, 2.0, now=0.25) is None
    assert s.decide(4, 2.0, now=0.75) is None
    second = s.decide(4, 2.0, now=1.0)  # exactly cooldown later: allowed
    assert second is not None and second.desired == 8


def test_cooldown_applies_to_scale_down_after_scale_up() -> None:
    s = scaler(target=1.0, cooldown=1.0)
    assert s.decide(2, 2.0, now=0.0) is not None  # 2 -> 4
    assert s.decide(4, 0.0, now=0.5) is None
    down = s.decide(4, 0.0, now=1.25)
    assert down is not None and down.desired == 1


def test_a_blocked_decision_does_not_restart_the_cooldown() -> None:
    s = scaler(target=1.0, cooldown=1.0)
    assert s.decide(2, 2.0, now=0.0) is not None
    for now in (0.25, 0.5, 0.75):
        assert s.decide(4, 2.0, now=now) is None
    assert s.decide(4, 2.0, now=1.0) is not None


# --- reasons --------------------------------------------------------------------------------


def test_scale_up_reason_names_the_signal_the_value_and_the_target() -> None:
    decision = scaler(target=4.0).decide(2, 9.5, now=0.0)
    assert decision is not None
    assert decision.reason == "in-flight/instance 9.5 > target 4"


def test_scale_down_reason_says_below_target() -> None:
    decision = scaler(target=4.0).decide(4, 1.0, now=0.0)
    assert decision is not None
    assert decision.reason == "in-flight/instance 1 < target 4"


@pytest.mark.parametrize(
    ("metric", "target", "observed", "reason"),
    [
        ("rps", 50.0, 120.0, "req/s/instance 120 > target 50"),
        ("p95_latency", 0.2, 0.75, "p95 latency s 0.75 > target 0.2"),
        ("cpu", 60.0, 95.5, "CPU %/instance 95.5 > target 60"),
        ("in_flight", 2.5, 7.25, "in-flight/instance 7.25 > target 2.5"),
    ],
)
def test_reason_labels_every_metric(
    metric: str, target: float, observed: float, reason: str
) -> None:
    decision = scaler(metric=metric, target=target).decide(1, observed, now=0.0)
    assert decision is not None
    assert decision.reason == reason


def test_reason_rounds_the_observed_value_to_three_significant_digits() -> None:
    decision = scaler(target=1.0).decide(1, 2.718281828, now=0.0)
    assert decision is not None
    assert decision.reason == "in-flight/instance 2.72 > target 1"


def test_reason_never_states_a_false_comparison_when_min_forces_the_change() -> None:
    decision = scaler(min=2, target=4.0).decide(1, 0.0, now=0.0)
    assert decision is not None and decision.desired == 2
    assert "0 > target 4" not in decision.reason
    assert "min" in decision.reason
