"""Leader election over a Lease: what one replica should do next, decided from what it saw.

Pure. The I/O (reading and writing the coordination.k8s.io/v1 Lease, with its
resourceVersion so that two writers conflict instead of both winning) is in
``control/leader.py``.

As client-go's leaderelection does it, expiry is judged on this replica's own clock: a
follower notes *when it first saw* the current record (holder, renewTime, resourceVersion)
and takes over once that record has not changed for ``leaseDurationSeconds``. Clocks of
different machines are never compared, so skew between them cannot cause two leaders.

A leader stops acting when it has not renewed for ``renew_deadline`` (less than the lease
duration), so it has stepped down before anyone may take over.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Step(enum.Enum):
    CREATE = "create"  # no Lease yet: create it holding it
    RENEW = "renew"  # we hold it: write a new renewTime
    ACQUIRE = "acquire"  # free or expired: write ourselves as holder
    FOLLOW = "follow"  # someone else holds it and it is fresh


@dataclass(frozen=True, slots=True)
class Record:
    """What matters of a Lease's spec, plus its resourceVersion (a change is a renewal)."""

    holder: str
    renew_time: str  # as the API wrote it; compared, never parsed
    duration: float
    transitions: int
    version: str


def next_step(record: Record | None, me: str, seen_since: float, now: float) -> Step:
    """``seen_since``: when this replica first saw ``record`` unchanged (its own clock)."""
    if record is None:
        return Step.CREATE
    if record.holder == me:
        return Step.RENEW
    if not record.holder or now - seen_since >= record.duration:
        return Step.ACQUIRE
    return Step.FOLLOW


def leading(renewed_at: float | None, now: float, renew_deadline: float) -> bool:
    """A holder acts only while its last successful renewal is recent enough."""
    return renewed_at is not None and now - renewed_at < renew_deadline


def renew_deadline(lease_duration: float, renew_every: float) -> float:
    """Stop leading this long after the last renewal: one renewal period before the lease
    expires for the others, so the old leader has stopped before a new one starts."""
    return max(renew_every, lease_duration - renew_every)
