"""Health decisions: active checks (rise/fall) and passive outlier detection.

Everything here is a pure state machine fed by the caller: the prober reports each check
result, the proxy reports each response or connect failure, and both apply the returned
decisions to endpoints (``Endpoint.up``, ``Endpoint.ejected``) and log the returned reasons.
Nothing here reads a clock, sleeps or logs.

Theory of operation, active checks: ``HealthTracker`` flips to DOWN only after ``fall``
consecutive failures and back to UP only after ``rise`` consecutive passes. A result that
agrees with the current state resets the opposite streak, so a backend alternating pass and
fail never flips at all (unless rise or fall is 1), and one lost probe never takes a backend
out (Traefik's complaint).

Passive checks: ``OutlierDetector`` counts consecutive failed requests (connect failure or
5xx) per endpoint of one upstream, and ejects an endpoint at ``consecutive_failures`` for
``base_time`` times the number of times it has been ejected (capped at ``max_time``), so a
backend that keeps failing stays out longer each time. The multiplier shrinks by one for
every ``base_time`` the endpoint then stays in. It never ejects more than
``max_ejection_percent`` of the upstream, so one bad deploy cannot empty the pool.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class Transition:
    """A health flip. ``reason`` is ready to log after the endpoint's name."""

    healthy: bool
    reason: str  # e.g. "DOWN after 3 failed checks: connect refused"
    at: float


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class HealthTracker:
    """Rise/fall thresholds over one endpoint's active check results."""

    __slots__ = ("_fails", "_passes", "changed_at", "fall", "healthy", "last_reason", "rise")

    def __init__(self, rise: int = 2, fall: int = 3, healthy: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self.last_reason = ""
        self.changed_at: float | None = None  # time of the last transition
        self._passes = 0
        self._fails = 0

    def observe(self, ok: bool, reason: str, now: float) -> Transition | None:
        """Record one check result; return the transition it causes, if any."""
        self.last_reason = reason
        if ok:
            self._fails = 0
            if self.healthy:
                return None
            self._passes += 1
            if self._passes < self.rise:
                return None
            self._passes = 0
            self.healthy = True
            text = f"UP after {_plural(self.rise, 'passed check')}"
        else:
            self._passes = 0
            if not self.healthy:
                return None
            self._fails += 1
            if self._fails < self.fall:
                return None
            self._fails = 0
            self.healthy = False
            text = f"DOWN after {_plural(self.fall, 'failed check')}"
        self.changed_at = now
        return Transition(self.healthy, f"{text}: {reason}" if reason else text, now)

    def __repr__(self) -> str:
        state = "UP" if self.healthy else "DOWN"
        return f"<HealthTracker {state} rise={self.rise} fall={self.fall}>"


_STATUS_ITEM = re.compile(r"(\d{3})|([1-5])xx|(\d{3})\s*-\s*(\d{3})", re.ASCII)
"""One item of a status set: ``204``, ``2xx`` or ``200-399``. Strict on purpose: ``int()``
would also take ``+200`` or ``2_00``."""


class StatusSet:
    """A set of expected HTTP statuses parsed once from "200-399", "200,204" or "2xx,304"."""

    __slots__ = ("_codes", "spec")

    def __init__(self, spec: str) -> None:
        codes: set[int] = set()
        for raw in spec.split(","):
            item = raw.strip().lower()
            if not item:
                raise ValueError(f"empty item in status set {spec!r}")
            if (m := _STATUS_ITEM.fullmatch(item)) is None:
                raise ValueError(f"bad status {item!r} in {spec!r}")
            single, xx, low_s, high_s = m.groups()
            if xx is not None:
                low, high = int(xx) * 100, int(xx) * 100 + 99
            elif single is not None:
                low = high = int(single)
            else:
                low, high = int(low_s), int(high_s)
            if not 100 <= low <= high <= 599:
                raise ValueError(f"status range {item!r} must lie within 100-599, low to high")
            codes.update(range(low, high + 1))
        self._codes = frozenset(codes)
        self.spec = spec

    def __contains__(self, status: object) -> bool:
        return status in self._codes

    def __repr__(self) -> str:
        return f"StatusSet({self.spec!r})"


@lru_cache(maxsize=64)
def parse_statuses(spec: str) -> StatusSet:
    """Parse (and remember) a status set; raises ValueError with the offending item."""
    return StatusSet(spec)


def next_interval(base: float, jitter_fraction: float, rng: random.Random) -> float:
    """``base`` seconds plus a random share of it, up to ``jitter_fraction`` (0 to 1).

    Jitter keeps checks from many workers or proxies, started together, from hitting every
    backend in the same instant forever after. It only ever adds (as Envoy's interval
    jitter does), so checks never come more often than the configured interval.
    """
    if not 0.0 <= jitter_fraction <= 1.0:
        raise ValueError("jitter_fraction must be in [0, 1]")
    if jitter_fraction == 0.0:
        return base
    return base * (1.0 + rng.uniform(0.0, jitter_fraction))


@dataclass(frozen=True, slots=True)
class Ejection:
    """An endpoint taken out by outlier detection until ``until``."""

    key: str
    until: float
    duration: float
    count: int  # how many times this endpoint has now been ejected (after decay)
    reason: str  # e.g. "ejected for 60s after 5 consecutive failures: 503"


class _Outlier:
    __slots__ = ("ejected_until", "ejections", "failures", "returned_at")

    def __init__(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.ejected_until: float | None = None
        self.returned_at: float | None = None


class OutlierDetector:
    """Passive health for one upstream: eject endpoints that keep failing real requests.

    ``consecutive_failures=0`` turns detection off: ``record`` then never ejects.
    """

    __slots__ = (
        "_ejected",
        "_members",
        "base_time",
        "consecutive_failures",
        "max_ejection_percent",
        "max_time",
    )

    def __init__(
        self,
        members: Iterable[str],
        consecutive_failures: int = 5,
        base_time: float = 30.0,
        max_time: float = 300.0,
        max_ejection_percent: float = 50.0,
    ) -> None:
        if consecutive_failures < 0 or base_time <= 0 or max_time < base_time:
            raise ValueError("need consecutive_failures >= 0 and 0 < base_time <= max_time")
        if not 0.0 <= max_ejection_percent <= 100.0:
            raise ValueError("max_ejection_percent must be in [0, 100]")
        self.consecutive_failures = consecutive_failures
        self.base_time = base_time
        self.max_time = max_time
        self.max_ejection_percent = max_ejection_percent
        self._members: dict[str, _Outlier] = {}
        self._ejected: set[str] = set()
        self.set_members(members)

    def set_members(self, members: Iterable[str]) -> None:
        """Adopt a reloaded endpoint list, keeping the state of endpoints that stay."""
        old = self._members
        self._members = {key: old.get(key) or _Outlier() for key in members}
        self._ejected &= self._members.keys()

    def max_ejected(self) -> int:
        """How many endpoints may be out at once: the share, rounded down."""
        return int(len(self._members) * self.max_ejection_percent / 100.0)

    def is_ejected(self, key: str) -> bool:
        return key in self._ejected

    def record(self, key: str, ok: bool, now: float, reason: str = "") -> Ejection | None:
        """Count one request outcome (``ok=False``: connect failure or 5xx)."""
        state = self._members.get(key)
        if state is None or key in self._ejected or not self.consecutive_failures:
            # Removed by a reload, a late answer from an ejected endpoint, or detection off.
            return None
        if ok:
            state.failures = 0
            return None
        state.failures += 1
        if state.failures < self.consecutive_failures:
            return None
        if len(self._ejected) >= self.max_ejected():
            # Keep the count: the next failure tries again, once another endpoint is back.
            return None
        if state.returned_at is not None:
            healthy_for = max(now - state.returned_at, 0.0)
            state.ejections = max(state.ejections - int(healthy_for // self.base_time), 0)
        state.ejections += 1
        duration = min(self.base_time * state.ejections, self.max_time)
        state.ejected_until = until = now + duration
        state.failures = 0
        self._ejected.add(key)
        streak = _plural(self.consecutive_failures, "consecutive failure")
        text = f"ejected for {duration:g}s after {streak}"
        return Ejection(
            key, until, duration, state.ejections, f"{text}: {reason}" if reason else text
        )

    def expired(self, now: float) -> list[str]:
        """Endpoints whose ejection has ended by ``now``: return them to service."""
        back: list[str] = []
        for key in self._ejected:
            state = self._members[key]
            assert state.ejected_until is not None
            if state.ejected_until <= now:
                back.append(key)
                state.returned_at = state.ejected_until
                state.ejected_until = None
                state.failures = 0
        self._ejected.difference_update(back)
        return sorted(back)

    def reinstate(self, key: str, now: float) -> bool:
        """End ``key``'s ejection before its time: an active check passed. Counts as a
        return at ``now`` (the ejection multiplier decays from here). True if it was out."""
        if key not in self._ejected:
            return False
        state = self._members[key]
        state.returned_at = now
        state.ejected_until = None
        state.failures = 0
        self._ejected.discard(key)
        return True
