"""Connections to backends and the per-endpoint pool of warm ones.

An ``UpstreamConnection`` carries one exchange at a time. While bound it hands every parsed
event to its ``sink`` (the exchange); while idle in the pool, any byte or close from the
backend retires it. The pool keeps idle connections LIFO, so the warmest is reused first and
the coldest age out through the idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Protocol

from portico.codec.events import Event
from portico.codec.parser import ResponseParser
from portico.dataplane.backendtls import client_context, tls_reason
from portico.dataplane.timers import Deadline
from portico.errors import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    UpstreamClosed,
    UpstreamError,
)
from portico.runtime.endpoint import Endpoint

log = logging.getLogger("portico.upstream")
# Seconds between two log lines about TLS failures to the same backend.
TLS_LOG_EVERY = 10.0

class UpstreamSink(Protocol):
    """What an upstream connection needs from the exchange using it."""

    def on_response_events(self, events: list[Event]) -> None: ...
    def on_upgraded(self, leftover: bytes) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...
    def on_tunnel_closed(self) -> None: ...
    def on_upstream_error(self, error: UpstreamError) -> None: ...
    def on_upstream_pause(self) -> None: ...
    def on_upstream_resume(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_idle_deadline",
        "bytes_in",
        "closed",
        "endpoint",
        "parser",
        "pool",
        "reusable",
        "sink",
        "transport",
        "tunnel",
        "uses",
    )

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.endpoint = pool.endpoint
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.sink: UpstreamSink | None = None
        self.closed = False
        self.reusable = True
        self.tunnel = False
        self.bytes_in = 0  # bytes received for the current exchange
        self.uses = 0
        self._idle_deadline: Deadline | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("busy" if self.sink else "idle")
        return f"<UpstreamConnection {self.endpoint.label} {state} uses={self.uses}>"

    # --- use by an exchange ---------------------------------------------------------------

    def bind(self, sink: UpstreamSink, method: bytes) -> None:
        self.sink = sink
        self.bytes_in = 0
        self.uses += 1
        self.parser.expect(method)
        if self._idle_deadline is not None:
            self._idle_deadline.clear()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def release(self) -> None:
        """The exchange is done with this connection: back to the pool or closed."""
        self.sink = None
        if self.reusable and not self.closed and not self.parser.garbage:
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.sink = None
        self.reusable = False
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        if self._idle_deadline is not None:
            self._idle_deadline.cancel()

    def abort(self) -> None:
        self.sink = None
        self.reusable = False
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if self._idle_deadline is not None:
            self._idle_deadline.cancel()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def start_idle_timer(self, timeout: float) -> None:
        if self._idle_deadline is None:
            loop = asyncio.get_running_loop()
            self._idle_deadline = Deadline(loop, self.close)
        self._idle_deadline.set(timeout)

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # A backend must not speak when not asked: never read this as the next response.
            self.close()
            return
        if self.tunnel:
            sink.on_tunnel_data(data)
            return
        self.bytes_in += len(data)
        try:
            events = self.parser.feed(data)
        except BadResponse as exc:
            self.reusable = False
            sink.on_upstream_error(exc)
            return
        if self.parser.garbage:
            self.reusable = False
        if events:
            sink.on_response_events(events)
        if self.parser.upgraded and self.sink is sink:
            self.reusable = False
            self.tunnel = True
            sink.on_upgraded(self.parser.upgrade_leftover)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._idle_deadline is not None:
            self._idle_deadline.cancel()
        self.pool.discard(self)
        sink = self.sink
        if sink is None:
            return
        if self.tunnel:
            sink.on_tunnel_closed()
            return
        try:
            if exc is not None and not self.parser.complete:
                # A reset is an error on the connection: it completes nothing, not even a
                # close-delimited body (RFC 9112 section 8).
                raise BadResponse("reset")
            events = self.parser.feed_eof()
        except BadResponse:
            reason = "upstream closed the connection" if exc is None else f"upstream reset: {exc}"
            sink.on_upstream_error(UpstreamClosed(reason, request_sent=True))
            return
        if events:
            sink.on_response_events(events)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_pause()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_resume()


class EndpointPool:
    """Idle keep-alive connections to one endpoint, and the way to open new ones."""

    __slots__ = ("_idle", "_tls_logged", "endpoint", "idle_timeout", "max_idle")

    def __init__(self, endpoint: Endpoint, max_idle: int, idle_timeout: float) -> None:
        self.endpoint = endpoint
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: list[UpstreamConnection] = []
        self._tls_logged = -TLS_LOG_EVERY  # when a TLS failure to this endpoint was last logged

    def __repr__(self) -> str:
        return f"<EndpointPool {self.endpoint.label} idle={len(self._idle)}>"

    def take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        if len(self._idle) >= self.max_idle:
            conn.close()
            return
        self._idle.append(conn)
        conn.start_idle_timer(self.idle_timeout)

    def discard(self, conn: UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    async def connect(self, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        host, port = self.endpoint.address
        tls = self.endpoint.tls
        try:
            async with asyncio.timeout(timeout):
                if tls is None:
                    _, proto = await loop.create_connection(
                        lambda: UpstreamConnection(self), host, port
                    )
                else:
                    _, proto = await loop.create_connection(
                        lambda: UpstreamConnection(self),
                        host,
                        port,
                        ssl=client_context(tls),
                        server_hostname=tls.server_name,
                    )
        except TimeoutError:
            raise ConnectTimeout(f"connect to {self.endpoint.label} timed out") from None
        except OSError as exc:
            reason = tls_reason(exc) if tls is not None else exc.strerror or type(exc).__name__
            if tls is not None and loop.time() - self._tls_logged >= TLS_LOG_EVERY:
                # A TLS failure is a configuration problem worth a log line (the client sees
                # only 502); once per interval, so a broken backend cannot flood the log.
                self._tls_logged = loop.time()
                log.warning("https backend %s: %s", self.endpoint.label, reason)
            raise ConnectFailed(f"connect to {self.endpoint.label} failed: {reason}") from None
        return proto

    def close_all(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class PoolSet:
    """One pool per endpoint address, created on first use and kept across reloads."""

    __slots__ = ("_pools",)

    def __init__(self) -> None:
        self._pools: dict[tuple[str, int], EndpointPool] = {}

    def get(self, endpoint: Endpoint, max_idle: int, idle_timeout: float) -> EndpointPool:
        pool = self._pools.get(endpoint.address)
        if pool is None:
            pool = self._pools[endpoint.address] = EndpointPool(endpoint, max_idle, idle_timeout)
        return pool

    def close_all(self) -> None:
        for pool in self._pools.values():
            pool.close_all()

