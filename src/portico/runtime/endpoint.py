"""Endpoint: one backend address and the live state balancers and the pool read.

Endpoints are keyed by address so that a reload can carry state (health, counters) over to
the new snapshot, as Caddy does.
"""

from __future__ import annotations


class Endpoint:
    """A backend address with its live counters. Hot: read on every request."""

    __slots__ = ("address", "authority", "host", "in_flight", "label", "port", "requests", "up", "weight")

    def __init__(self, host: str, port: int, weight: int = 1) -> None:
        self.host = host
        self.port = port
        self.address = (host, port)
        self.label = f"{host}:{port}"
        # Host header for requests that arrive without one (HTTP/1.0 clients).
        self.authority = self.label.encode("idna")
        self.weight = weight
        self.in_flight = 0
        self.requests = 0
        self.up = True

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"<Endpoint {self.label} {state} in_flight={self.in_flight}>"
