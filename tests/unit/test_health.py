"""Health decisions: rise/fall, flapping, status sets, jitter, outlier ejection."""

from __future__ import annotations

import itertools
import random

import pytest

from portico.policy.health import (
    Ejection,
    HealthTracker,
    OutlierDetector,
    StatusSet,
    Transition,
    next_interval,
    parse_statuses,
)

# --- rise / fall -----------------------------------------------------------------------------


def test_down_after_fall_consecutive_failures_with_reason() -> None:
    t = HealthTracker(rise=2, fall=3)
    assert t.observe(False, "connect refused", 1.0) is None
    assert t.observe(False, "connect refused", 2.0) is None
    got = t.observe(False, "connect refused", 3.0)
    assert got == Transition(False, "DOWN after 3 failed checks: connect refused", 3.0)
    assert not t.healthy and t.changed_at == 3.0
    assert t.observe(False, "connect refused", 4.0) is None  # already down: no repeat


def test_up_after_rise_consecutive_passes() -> None:
    t = HealthTracker(rise=2, fall=1, healthy=False)
    assert t.observe(True, "200", 1.0) is None
    assert t.observe(True, "200", 2.0) == Transition(True, "UP after 2 passed checks: 200", 2.0)
    assert t.observe(True, "200", 3.0) is None


def test_singular_wording_and_no_reason() -> None:
    t = HealthTracker(rise=1, fall=1)
    assert t.observe(False, "", 0.0) == Transition(False, "DOWN after 1 failed check", 0.0)
    assert t.observe(True, "", 1.0) == Transition(True, "UP after 1 passed check", 1.0)


def test_one_lost_probe_does_not_take_a_backend_out() -> None:
    t = HealthTracker(rise=2, fall=3)
    for i in range(100):
        ok = i % 3 != 0  # every third check fails: never 3 in a row
        assert t.observe(ok, "timeout" if not ok else "", float(i)) is None
    assert t.healthy


@pytest.mark.parametrize(("rise", "fall"), [(2, 2), (2, 3), (3, 2), (5, 5)])
@pytest.mark.parametrize("start", [True, False])
def test_alternating_pass_fail_never_flips(rise: int, fall: int, start: bool) -> None:
    t = HealthTracker(rise=rise, fall=fall, healthy=start)
    for i in range(1000):
        assert t.observe(i % 2 == 0, "flap", float(i)) is None
    assert t.healthy is start


def reference_flips(results: list[bool], rise: int, fall: int) -> list[int]:
    """Indexes where the state must flip: the end of the first run long enough to flip it."""
    healthy, run, flips = True, 0, []
    for i, ok in enumerate(results):
        if ok == healthy:
            run = 0
            continue
        run += 1
        if run == (rise if ok else fall):
            healthy, run = ok, 0
            flips.append(i)
    return flips


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("rise", "fall"), [(1, 1), (2, 3), (4, 2)])
def test_flips_exactly_where_rise_and_fall_allow(seed: int, rise: int, fall: int) -> None:
    rng = random.Random(seed)
    results = [rng.random() < 0.6 for _ in range(2000)]
    t = HealthTracker(rise=rise, fall=fall)
    flips = [i for i, ok in enumerate(results) if t.observe(ok, "", float(i)) is not None]
    assert flips == reference_flips(results, rise, fall)
    # And between two flips there are always at least min(rise, fall) checks.
    assert all(b - a >= min(rise, fall) for a, b in itertools.pairwise(flips))


def test_tracker_rejects_zero_thresholds() -> None:
    with pytest.raises(ValueError):
        HealthTracker(rise=0)
    with pytest.raises(ValueError):
        HealthTracker(fall=0)


# --- expected status sets --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "inside", "outside"),
    [
        ("200-399", [200, 204, 301, 399], [199, 400, 500]),
        ("200,204,300-399", [200, 204, 300, 350, 399], [201, 299, 400]),
        ("200", [200], [201, 204]),
        ("2xx, 304", [200, 250, 299, 304], [300, 404]),
        (" 200 - 204 , 418 ", [200, 202, 204, 418], [205, 417]),
        ("100-599", [100, 599], [99, 600]),
    ],
)
def test_status_set(spec: str, inside: list[int], outside: list[int]) -> None:
    matcher = StatusSet(spec)
    for status in inside:
        assert status in matcher and status in parse_statuses(spec)
    for status in outside:
        assert status not in matcher and status not in parse_statuses(spec)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "200,",
        "abc",
        "399-200",
        "99",
        "600",
        "200-700",
        "2xx-3xx",
        "6xx",
        "20x",
        "+200",
        "2_00",
        "\uff12\uff10\uff10",  # fullwidth digits: int() would accept them
        "200-",
        "-200",
        "0200",
    ],
)
def test_status_set_refuses_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        StatusSet(spec)


def test_status_sets_are_parsed_once() -> None:
    assert parse_statuses("200-299") is parse_statuses("200-299")


# --- check interval jitter -------------------------------------------------------------------


def test_next_interval_only_adds_up_to_the_jitter_share() -> None:
    rng = random.Random(4)
    values = [next_interval(10.0, 0.2, rng) for _ in range(5000)]
    assert min(values) >= 10.0 and max(values) <= 12.0  # never more often than configured
    assert abs(sum(values) / len(values) - 11.0) < 0.05
    assert max(values) - min(values) > 1.8  # actually spread, not constant
    assert all(10.0 <= next_interval(10.0, 1.0, rng) <= 20.0 for _ in range(100))


def test_next_interval_without_jitter_is_exact() -> None:
    assert next_interval(5.0, 0.0, random.Random()) == 5.0


@pytest.mark.parametrize("jitter", [-0.1, 1.01, 2.0])
def test_next_interval_refuses_bad_jitter(jitter: float) -> None:
    with pytest.raises(ValueError):
        next_interval(5.0, jitter, random.Random())


# --- outlier detection -----------------------------------------------------------------------

KEYS = ["a:1", "b:1", "c:1", "d:1"]


def fail(
    det: OutlierDetector, key: str, times: int, now: float, reason: str = "503"
) -> Ejection | None:
    result = None
    for _ in range(times):
        result = det.record(key, False, now, reason)
    return result


def test_ejects_after_consecutive_failures_only() -> None:
    det = OutlierDetector(KEYS, consecutive_failures=3, base_time=30.0, max_time=300.0)
    assert fail(det, "a:1", 2, 0.0) is None
    assert det.record("a:1", True, 0.0) is None  # a success breaks the streak
    assert fail(det, "a:1", 2, 0.0) is None
    ej = det.record("a:1", False, 1.0, "connect refused")
    assert ej is not None
    assert (ej.key, ej.until, ej.duration, ej.count) == ("a:1", 31.0, 30.0, 1)
    assert ej.reason == "ejected for 30s after 3 consecutive failures: connect refused"
    assert det.is_ejected("a:1") and not det.is_ejected("b:1")


def test_ejection_time_grows_and_is_capped() -> None:
    det = OutlierDetector(KEYS, consecutive_failures=1, base_time=30.0, max_time=100.0)
    now = 0.0
    durations = []
    for _ in range(5):
        ej = det.record("a:1", False, now)
        assert ej is not None
        durations.append(ej.duration)
        now = ej.until
        assert det.expired(now) == ["a:1"]
    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0]


def test_multiplier_decays_while_the_endpoint_behaves() -> None:
    det = OutlierDetector(KEYS, consecutive_failures=1, base_time=10.0, max_time=1000.0)
    now = 0.0
    for _ in range(3):
        ej = det.record("a:1", False, now)
        assert ej is not None
        now = ej.until
        det.expired(now)
    # Ejected 3 times; back at `now`. 25 s of good behaviour forgives two ejections.
    ej = det.record("a:1", False, now + 25.0)
    assert ej is not None and ej.count == 2 and ej.duration == 20.0


def test_expired_returns_endpoints_whose_time_is_up() -> None:
    det = OutlierDetector(KEYS, consecutive_failures=1, base_time=10.0, max_time=100.0)
    assert det.expired(1e9) == []
    det.record("a:1", False, 0.0)
    det.record("b:1", False, 5.0)
    assert det.expired(9.9) == []
    assert det.expired(10.0) == ["a:1"]
    assert det.expired(14.9) == []
    assert det.expired(100.0) == ["b:1"]
    assert not det.is_ejected("a:1") and not det.is_ejected("b:1")


def test_a_passing_check_reinstates_at_once_and_counts_as_a_return() -> None:
    det = OutlierDetector(KEYS, consecutive_failures=1, base_time=10.0, max_time=1000.0)
    assert det.reinstate("a:1", 1.0) is False  # not ejected: nothing to end
    now = 0.0
    for _ in range(3):
        ej = det.record("a:1", False, now)
        assert ej is not None
        now = ej.until
        det.expired(now)
    ej = det.record("a:1", False, now)  # now = 60: the 4th ejection, until 100
    assert ej is not None and (ej.count, ej.until) == (4, 100.0)
    assert det.reinstate("a:1", 61.0) is True
    assert not det.is_ejected("a:1")
    assert det.expired(1e9) == []  # the cancelled deadline no longer returns it
    # The multiplier decays from the reinstatement (61), not from the cancelled deadline.
    ej = det.record("a:1", False, 71.5)
    assert ej is not None and (ej.count, ej.duration) == (4, 40.0)


def test_never_ejects_more_than_the_share() -> None:
    det = OutlierDetector(KEYS, consecutive_failures=2, max_ejection_percent=50.0)
    assert det.max_ejected() == 2
    assert fail(det, "a:1", 2, 0.0) is not None
    assert fail(det, "b:1", 2, 0.0) is not None
    assert fail(det, "c:1", 5, 0.0) is None  # the whole fleet failing: keep half serving
    assert not det.is_ejected("c:1")
    det.expired(1e6)  # a and b return...
    ej = det.record("c:1", False, 1e6)  # ...and c, still failing, goes at its next failure
    assert ej is not None and ej.key == "c:1"


@pytest.mark.parametrize(
    ("members", "percent", "most"), [(1, 100, 1), (1, 50, 0), (3, 10, 0), (3, 50, 1), (10, 10, 1)]
)
def test_max_ejected_rounds_down(members: int, percent: float, most: int) -> None:
    det = OutlierDetector([f"h:{i}" for i in range(members)], max_ejection_percent=percent)
    assert det.max_ejected() == most


def test_late_answers_from_ejected_and_unknown_endpoints_are_ignored() -> None:
    det = OutlierDetector(KEYS, consecutive_failures=1)
    assert det.record("a:1", False, 0.0) is not None
    assert det.record("a:1", False, 1.0) is None
    assert det.record("a:1", True, 1.0) is None
    assert det.is_ejected("a:1")
    assert det.record("zz:9", False, 0.0) is None


def test_reload_keeps_state_of_endpoints_that_stay() -> None:
    det = OutlierDetector(KEYS, consecutive_failures=3)
    fail(det, "a:1", 2, 0.0)
    assert det.record("b:1", False, 0.0) is None
    fail(det, "b:1", 2, 0.0)  # b ejected
    det.set_members(["a:1", "c:1", "e:1"])
    assert not det.is_ejected("b:1")  # b is gone: forgotten
    assert det.record("a:1", False, 1.0) is not None  # a's streak of 2 survived the reload
    assert det.record("e:1", False, 1.0) is None


def test_zero_consecutive_failures_turns_detection_off() -> None:
    det = OutlierDetector(KEYS, consecutive_failures=0)
    assert fail(det, "a:1", 100, 0.0) is None
    assert not det.is_ejected("a:1")


def test_detector_validates_settings() -> None:
    with pytest.raises(ValueError):
        OutlierDetector(KEYS, consecutive_failures=-1)
    with pytest.raises(ValueError):
        OutlierDetector(KEYS, base_time=10.0, max_time=5.0)
    with pytest.raises(ValueError):
        OutlierDetector(KEYS, max_ejection_percent=120.0)
