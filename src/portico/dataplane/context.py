"""What every client connection of one worker shares: the current snapshot and settings.

The gateway owns one ``ProxyContext`` per worker process and swaps ``snapshot`` on reload;
connections read it once per request, so a swap applies from the next request on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from portico.config.model import ClientTimeouts, Limits
from portico.dataplane.upstream import PoolSet
from portico.runtime.snapshot import Snapshot

if TYPE_CHECKING:
    from portico.dataplane.accesslog import AccessLog
    from portico.dataplane.exchange import HandlerFactory, LocalFactory
    from portico.dataplane.metrics import RequestMetrics
    from portico.runtime.traffic import ConnectionLimits


class Closable(Protocol):
    def shutdown(self) -> None: ...
    def abort(self) -> None: ...


@dataclass(slots=True)
class ClientSettings:
    """Client-side limits and timeouts, flattened for the hot path."""

    max_target: int
    max_header_bytes: int
    max_headers: int
    max_body: int | None
    drop_underscores: bool
    header_timeout: float
    body_idle_timeout: float
    body_min_rate: float
    body_grace: float
    keepalive_timeout: float
    send_timeout: float

    @classmethod
    def from_config(cls, limits: Limits, timeouts: ClientTimeouts) -> ClientSettings:
        return cls(
            max_target=limits.max_request_line,
            max_header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
            max_body=int(limits.max_body_bytes) if limits.max_body_bytes is not None else None,
            drop_underscores=not limits.underscores_in_headers,
            header_timeout=timeouts.header,
            body_idle_timeout=timeouts.body_idle,
            body_min_rate=timeouts.body_min_rate,
            body_grace=timeouts.body_grace,
            keepalive_timeout=timeouts.keepalive,
            send_timeout=timeouts.send,
        )


class ProxyContext:
    __slots__ = (
        "access_log",
        "closing",
        "conn_limits",
        "connections",
        "handlers",
        "local",
        "loop",
        "metrics",
        "pools",
        "settings",
        "snapshot",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        snapshot: Snapshot,
        settings: ClientSettings,
        access_log: AccessLog | None,
        handlers: dict[str, HandlerFactory],
        local: LocalFactory,
    ) -> None:
        # Handlers by route kind, and the local handler, given by the composition root so
        # that neither the connection nor the pipeline imports a handler.
        self.handlers = handlers
        self.local = local
        self.loop = loop
        self.snapshot = snapshot
        self.settings = settings
        self.access_log = access_log
        self.pools = PoolSet()
        self.connections: set[Closable] = set()
        self.closing = False
        # Connection caps (runtime.traffic), set by the gateway when configured.
        self.conn_limits: ConnectionLimits | None = None
        # Request counters, when metrics are on (dataplane.metrics); None costs nothing.
        self.metrics: RequestMetrics | None = None
