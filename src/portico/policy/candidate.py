"""``Candidate``: what balancing and health policies read of an endpoint.

Policies are pure and sit below the runtime, so they do not import ``runtime.endpoint``;
they declare the few attributes they use and ``runtime.endpoint.Endpoint`` provides them.
Balancers are generic over it (``pick(Sequence[C]) -> C | None``), so the caller gets back
its own endpoint type.
"""

from __future__ import annotations

from typing import Protocol, TypeVar


class Candidate(Protocol):
    label: str  # "host:port": what hashing keys on
    weight: int
    backup: bool
    up: bool
    ejected: bool
    draining: bool
    healthy_since: float | None
    in_flight: int
    # Written by policies: the slow-start factor before a pick, the latency EWMA after.
    ramp: float
    ewma_latency: float
    latency_at: float | None

    @property
    def available(self) -> bool: ...


C = TypeVar("C", bound=Candidate)
