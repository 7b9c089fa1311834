"""The Upgrade tunnel half of a proxy exchange: after a 101, bytes flow both ways unparsed.

A tunnel has no framing: either side closing is its normal end. Its only timer is the
upstream's body-idle timeout, re-armed by traffic in either direction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from portico.dataplane.exchange import ClientSide
    from portico.dataplane.upstream import UpstreamConnection
    from portico.runtime.routes import RouteTarget


class TunnelMixin:
    # Empty slots keep the exchange free of a __dict__; hidden from mypy, which would
    # otherwise refuse assignments to the attributes the exchange's own slots declare.
    if not TYPE_CHECKING:
        __slots__ = ()
    conn: ClientSide
    upstream: UpstreamConnection | None
    target: RouteTarget | None

    def _arm(self, kind: int, delay: float) -> None: ...
    def _finish(self, keep_alive: bool, abort: bool = False) -> None: ...

    def _idle(self) -> float:
        target = self.target
        assert target is not None
        return target.body_idle_timeout

    def on_upgraded(self, leftover: bytes) -> None:
        conn = self.conn
        conn.tunnel = True
        self._arm(U_BODY, self._idle())
        if leftover:
            conn.write(leftover)
        client_leftover = conn.take_upgrade_leftover()
        if client_leftover and self.upstream is not None:
            self.upstream.write(client_leftover)

    def on_tunnel_data(self, data: bytes) -> None:
        self.conn.write(data)
        self.conn.up_timer.set(self._idle())

    def on_tunnel_closed(self) -> None:
        # Close the client gracefully so the bytes already queued for it are still delivered.
        self.upstream = None
        self._finish(False)

    def tunnel_from_client(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
            self.conn.up_timer.set(self._idle())


# Upstream timer kinds of a proxy exchange (shared with proxy.py).
U_NONE, U_HEADER, U_BODY, U_COLD = range(4)
