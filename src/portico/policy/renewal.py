"""When to renew an automatic certificate, and how long to wait after a failure.

Renewal starts once ``renew_at`` of the lifetime has passed (two thirds by default, as
Let's Encrypt and Caddy advise: a 90-day certificate renews with 30 days left, time for many
retries). A random jitter of up to 5% of the lifetime, drawn by the caller, spreads the
renewals of many certificates (and many gateways) so they do not hit the CA at once.
Failures back off exponentially from ``retry_min`` to ``retry_max``, and never past the
point where the certificate would expire first.
"""

from __future__ import annotations

from dataclasses import dataclass

# Share of the lifetime the jitter may add (the caller draws a number in [0, 1)).
JITTER_SHARE = 0.05


@dataclass(frozen=True, slots=True)
class Validity:
    not_before: float  # seconds since the epoch
    not_after: float


def renew_time(v: Validity, renew_at: float, draw: float) -> float:
    """The moment to start renewing ``v``; ``draw`` is uniform in [0, 1)."""
    life = max(v.not_after - v.not_before, 0.0)
    at = v.not_before + life * renew_at + life * JITTER_SHARE * draw
    return min(at, v.not_after - life * 0.05)  # always some margin before the end


def needs_certificate(v: Validity | None, now: float, renew_at: float, draw: float) -> bool:
    """No certificate, one not valid now, or one past its renewal time."""
    if v is None or now < v.not_before or now >= v.not_after:
        return True
    return now >= renew_time(v, renew_at, draw)


def retry_delay(failures: int, retry_min: float, retry_max: float) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (1 = the first)."""
    return min(retry_max, retry_min * 2.0 ** max(failures - 1, 0))


def next_attempt(
    v: Validity | None, now: float, renew_at: float, draw: float,
    failures: int, retry_min: float, retry_max: float,
) -> float:
    """When to try next: the renewal time, or after a failure its back-off (capped so that a
    still-valid certificate is retried before it runs out)."""
    if failures:
        at = now + retry_delay(failures, retry_min, retry_max)
        if v is not None and now < v.not_after:
            at = min(at, max(now + retry_min, v.not_after - (v.not_after - now) / 2))
        return at
    if v is None or now < v.not_before or now >= v.not_after:
        return now
    return max(now, renew_time(v, renew_at, draw))
