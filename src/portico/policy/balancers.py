"""Load-balancing policies. A balancer only ever chooses among the endpoints it is given.

The seam is one method, ``pick(endpoints, key)``: the caller passes the endpoints that are
available right now (up, not draining, not already tried) and an optional affinity key
(client address, header value...). Balancers keep only their own cursor state; endpoint
counters such as ``in_flight`` live on the endpoints. Registry: ``BALANCERS[name]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from portico.runtime.endpoint import Endpoint


class Balancer(Protocol):
    def pick(self, endpoints: Sequence[Endpoint], key: str | None = None) -> Endpoint | None: ...


class RoundRobin:
    """Each endpoint in turn. Best when requests cost about the same and backends are alike."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, endpoints: Sequence[Endpoint], key: str | None = None) -> Endpoint | None:
        n = len(endpoints)
        if n == 0:
            return None
        i = self._next % n
        self._next = i + 1
        return endpoints[i]


class LeastConnections:
    """Fewest in-flight requests per unit of weight; ties go round robin.

    Best when request cost varies (slow reports next to fast lookups), so that a backend
    stuck on slow work stops being handed more.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, endpoints: Sequence[Endpoint], key: str | None = None) -> Endpoint | None:
        n = len(endpoints)
        if n == 0:
            return None
        start = self._next % n
        self._next = start + 1
        best: Endpoint | None = None
        best_load = 0.0
        # Scan from a rotating start so ties spread instead of piling onto endpoint 0.
        for j in range(n):
            ep = endpoints[(start + j) % n]
            load = ep.in_flight / ep.weight
            if best is None or load < best_load:
                best, best_load = ep, load
        return best


BALANCERS: dict[str, Callable[[], Balancer]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
}
