"""Endpoint: one backend address and the live state balancers and the pool read.

Endpoints are keyed by address so that a reload can carry state (health, counters) over to
the new snapshot, as Caddy does.

Who writes what (everything is read by ``policy.balancers``):

* ``weight``, ``backup``: the compiled config (a reload rewrites them in place).
* ``up``: the active health checker, from ``policy.health.HealthTracker`` transitions.
* ``ejected``: passive outlier detection (``policy.health.OutlierDetector``); set on ejection,
  cleared on expiry or by a passing active check (``OutlierDetector.reinstate``). Kept apart
  from ``up`` so that an ejection expiry cannot revive an endpoint the active checker holds
  down.
* ``draining``: the supervisor on scale-down; in-flight requests finish, no new ones start.
* ``healthy_since``: whoever turns the endpoint available (health UP, scale-up); slow start
  ramps its share from that moment. ``None`` means "no ramp", as at startup.
* ``ramp``: a cache of the slow-start factor, written only by
  ``policy.balancers.select_candidates`` immediately before a pick.
* ``ewma_latency``, ``latency_at``: ``policy.balancers.record_latency``.
* ``in_flight``, ``requests``: the data plane, per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from portico.runtime.tlstarget import TlsTarget


class Endpoint:
    """A backend address with its live counters. Hot: read on every request."""

    __slots__ = (
        "address",
        "authority",
        "backup",
        "draining",
        "ejected",
        "ewma_latency",
        "healthy_since",
        "host",
        "in_flight",
        "label",
        "latency_at",
        "port",
        "ramp",
        "requests",
        "tls",
        "up",
        "weight",
    )

    def __init__(self, host: str, port: int, weight: int = 1, *, backup: bool = False) -> None:
        self.host = host
        self.port = port
        self.address = (host, port)
        self.label = f"{host}:{port}"
        # Host header for requests that arrive without one (HTTP/1.0 clients).
        self.authority = self.label.encode("idna")
        self.weight = weight
        self.backup = backup
        self.in_flight = 0
        self.requests = 0
        self.up = True
        self.ejected = False
        # How to speak TLS to it (runtime.tlstarget.TlsTarget), None for plain HTTP.
        self.tls: TlsTarget | None = None
        self.draining = False
        self.healthy_since: float | None = None
        # 1.0 = full share; slow start lowers it to as little as 0.1 (see select_candidates).
        self.ramp = 1.0
        # Peak-EWMA response latency in seconds; 0.0 with latency_at None = never measured.
        self.ewma_latency = 0.0
        self.latency_at: float | None = None

    @property
    def available(self) -> bool:
        """May receive new requests (ignoring the backup rule, which needs the whole pool)."""
        return self.up and not self.ejected and not self.draining

    def __repr__(self) -> str:
        if not self.up:
            state = "down"
        elif self.ejected:
            state = "ejected"
        elif self.draining:
            state = "draining"
        else:
            state = "up"
        extra = " backup" if self.backup else ""
        return f"<Endpoint {self.label} {state}{extra} in_flight={self.in_flight}>"
