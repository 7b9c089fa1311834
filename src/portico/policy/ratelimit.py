"""Rate limiting by GCRA (the generic cell rate algorithm), decided in pure code.

GCRA keeps one number per key, the *theoretical arrival time* (TAT): when the key's bucket
would be empty again if requests kept arriving at exactly the configured rate. With an
emission interval ``T = period / rate`` and a tolerance ``tau = (burst - 1) * T``, a request
at ``now`` conforms when ``max(TAT, now) - tau <= now``; conforming moves TAT on by ``T``.
It is exactly a token bucket of ``burst`` tokens refilled at ``rate`` per ``period`` (so in
any window of ``t`` seconds a key gets at most ``burst + rate * t / period`` requests), but
needs one float instead of two and no timer: a TAT in the past is the same as no entry at
all, which is what lets the state table drop expired keys without changing any decision.

A request that does not conform may be *delayed* rather than refused (nginx ``delay``): when
it would conform within ``max_delay`` seconds it takes its place now (TAT moves on) and
waits. Otherwise it is refused and TAT is unchanged, so refused requests cost the client
nothing (nginx behaves the same).
"""

from __future__ import annotations

import math

ALLOW, DELAY, REJECT = 0, 1, 2
# Float slack: a request arriving exactly on its turn must not be refused by rounding
# (0.1 + 0.2 > 0.3), which would shift a steady client's phase and cost it a request a turn.
EPSILON = 1e-9


def gcra(
    tat: float, now: float, interval: float, tolerance: float, max_delay: float = 0.0
) -> tuple[int, float, float]:
    """One request against one key: ``(verdict, new_tat, wait)``.

    ``wait`` is the delay for DELAY and the Retry-After (seconds) for REJECT; 0 for ALLOW.
    """
    base = tat if tat > now else now
    allow_at = base - tolerance
    if allow_at <= now + EPSILON:
        return ALLOW, base + interval, 0.0
    wait = allow_at - now
    if wait <= max_delay:
        return DELAY, base + interval, wait
    return REJECT, tat, wait


def remaining(tat: float, now: float, interval: float, tolerance: float) -> int:
    """Requests the key may still send right now (for the ``RateLimit`` header)."""
    return max(0, int((now + tolerance + interval - max(tat, now)) / interval + 1e-9))


def reset_after(tat: float, now: float) -> int:
    """Whole seconds until the key's whole burst is available again."""
    return max(0, math.ceil(tat - now))


def retry_after(wait: float) -> int:
    """Retry-After is whole seconds; rounding down would invite a retry that is refused."""
    return max(1, math.ceil(wait))


class Limit:
    """One configured limit's parameters, precomputed for ``gcra``."""

    __slots__ = ("burst", "interval", "max_delay", "period", "rate", "tolerance")

    def __init__(self, rate: float, period: float, burst: int, max_delay: float = 0.0) -> None:
        if rate <= 0 or period <= 0:
            raise ValueError("rate and period must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self.rate = rate
        self.period = period
        self.burst = burst
        self.interval = period / rate
        self.tolerance = (burst - 1) * self.interval
        self.max_delay = max_delay

    def decide(self, tat: float, now: float) -> tuple[int, float, float]:
        return gcra(tat, now, self.interval, self.tolerance, self.max_delay)

    def __repr__(self) -> str:
        return f"Limit({self.rate:g}/{self.period:g}s burst={self.burst})"
