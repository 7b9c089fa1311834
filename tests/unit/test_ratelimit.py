"""GCRA decisions and the limiter table: values in, values out, no clock."""

from __future__ import annotations

import mmap

import pytest

from portico.policy.ratelimit import (
    ALLOW,
    DELAY,
    REJECT,
    Limit,
    gcra,
    remaining,
    retry_after,
)
from portico.runtime.limittable import LimitTable, key_hash, table_bytes


def run(limit: Limit, times: list[float]) -> list[int]:
    tat = 0.0
    out = []
    for now in times:
        verdict, new, _ = limit.decide(tat, now)
        if verdict != REJECT:
            tat = new
        out.append(verdict)
    return out


def test_burst_at_once_then_the_rate() -> None:
    limit = Limit(rate=10, period=1, burst=5)
    # Six at t=100: the burst of five passes, the sixth is refused.
    assert run(limit, [100.0] * 6) == [ALLOW] * 5 + [REJECT]


@pytest.mark.parametrize(("rate", "burst", "seconds"), [(20, 5, 5.0), (3, 1, 10.0), (100, 50, 2.0)])
def test_allowed_count_is_burst_plus_rate_times_time(rate: int, burst: int, seconds: float) -> None:
    # A client sending twice the rate gets exactly burst + rate * seconds (the first request
    # at t=0 counts as the start of the window).
    limit = Limit(rate=rate, period=1, burst=burst)
    step = 1 / (2 * rate)
    times = [1000.0 + i * step for i in range(int(seconds / step) + 1)]
    allowed = sum(v == ALLOW for v in run(limit, times))
    assert allowed == burst + int(rate * seconds)


def test_rate_per_minute() -> None:
    limit = Limit(rate=60, period=60, burst=1)
    assert run(limit, [0.0, 0.5, 1.0, 1.5, 2.0]) == [ALLOW, REJECT, ALLOW, REJECT, ALLOW]


def test_refused_requests_cost_nothing() -> None:
    limit = Limit(rate=1, period=1, burst=1)
    verdict, tat, _ = limit.decide(0.0, 10.0)
    assert verdict == ALLOW
    verdict, tat2, wait = limit.decide(tat, 10.5)
    assert (verdict, tat2) == (REJECT, tat)
    assert wait == pytest.approx(0.5)
    assert retry_after(wait) == 1


def test_delay_up_to_a_bound() -> None:
    limit = Limit(rate=10, period=1, burst=1, max_delay=0.25)
    tat = 0.0
    verdicts = []
    for _ in range(5):
        verdict, new, wait = limit.decide(tat, 50.0)
        verdicts.append((verdict, round(wait, 3)))
        if verdict != REJECT:
            tat = new
    # One now, then 0.1 s and 0.2 s of delay (each takes its place), then refused (0.3 > 0.25).
    assert verdicts == [(ALLOW, 0.0), (DELAY, 0.1), (DELAY, 0.2), (REJECT, 0.3), (REJECT, 0.3)]


def test_remaining() -> None:
    limit = Limit(rate=10, period=1, burst=5)
    assert remaining(0.0, 7.0, limit.interval, limit.tolerance) == 5
    _, tat, _ = gcra(0.0, 7.0, limit.interval, limit.tolerance)
    assert remaining(tat, 7.0, limit.interval, limit.tolerance) == 4


@pytest.mark.parametrize(("rate", "period", "burst"), [(0, 1, 1), (-1, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_bad_limits_are_refused(rate: float, period: float, burst: int) -> None:
    with pytest.raises(ValueError):
        Limit(rate, period, burst)


def table(keys: int) -> LimitTable:
    return LimitTable(memoryview(mmap.mmap(-1, table_bytes(keys))))


def test_table_keeps_one_state_per_key() -> None:
    t = table(1024)
    limit = Limit(rate=1, period=1, burst=2)
    a, b = key_hash(b"a"), key_hash(b"b")
    assert [t.rate(a, limit, 5.0)[0] for _ in range(3)] == [ALLOW, ALLOW, REJECT]
    assert t.rate(b, limit, 5.0)[0] == ALLOW  # another key is unaffected
    t.refund(a, limit.interval)
    assert t.rate(a, limit, 5.0)[0] == ALLOW


def test_table_memory_is_fixed_under_a_flood_of_keys() -> None:
    # Many more keys than slots: the table never grows, expired entries are reused first and
    # a live key keeps its state while the flood uses other slots.
    t = table(64)
    limit = Limit(rate=1, period=60, burst=1)
    hot = key_hash(b"hot")
    assert t.rate(hot, limit, 0.0)[0] == ALLOW
    for i in range(10_000):
        t.rate(key_hash(b"%d" % i), limit, 1000.0 + i * 60)  # each expires before the next
    assert len(t.buf) == table_bytes(64)
    assert t.evicted == 0
    # Spent state is the same as no state: the hot key's TAT expired long ago.
    assert t.rate(hot, limit, 1000.0)[0] == ALLOW


def test_live_entries_are_evicted_only_when_a_bucket_is_full() -> None:
    t = table(8)  # one bucket of eight slots
    limit = Limit(rate=1, period=60, burst=1)
    for i in range(8):
        assert t.rate(key_hash(b"%d" % i), limit, 0.0)[0] == ALLOW
    assert t.evicted == 0
    t.rate(key_hash(b"new"), limit, 0.0)
    assert t.evicted == 1


def test_concurrency_counts() -> None:
    t = table(64)
    k = key_hash(b"client")
    assert [t.acquire(k, 2) for _ in range(3)] == [True, True, False]
    t.release(k)
    assert t.acquire(k, 2)
    for _ in range(5):
        t.release(k)
    assert t.count(k) == 0.0  # never below zero


def test_a_million_distinct_keys_keep_memory_and_cost_flat() -> None:
    # The flood a spoofing or botnet client makes: every request a new key. The table's
    # memory is fixed when it is made, and the time per decision does not grow with the
    # number of keys seen (no dict to resize, no list to scan).
    import time

    import psutil

    keys = 1 << 20
    t = table(keys)
    limit = Limit(rate=10, period=3600, burst=5)  # every key stays live for the whole run
    me = psutil.Process()
    before = me.memory_info().rss
    timings = []
    n = 0
    for _ in range(10):
        began = time.perf_counter()
        for _key in range(100_000):
            t.rate(key_hash(b"10.%d" % n), limit, 1000.0 + n * 1e-5)
            n += 1
        timings.append(time.perf_counter() - began)
    grown = me.memory_info().rss - before
    assert grown <= len(t.buf) + (8 << 20), grown  # the table itself, and a little more
    first, last = min(timings[:3]), min(timings[-3:])
    assert last < first * 2, timings
    # The table is full of live keys: new ones now evict the oldest, never grow anything.
    assert t.evicted > 0
