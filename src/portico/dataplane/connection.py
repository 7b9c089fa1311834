"""One client connection: parse requests, run exchanges in order, enforce client timeouts.

Theory of operation. Every parsed event goes into ``_queue``; ``_pump`` hands events to the
current exchange, and starts the next exchange only when the previous one has finished, so
pipelined requests are answered strictly in order. While a later request waits in the queue,
reading is paused, which bounds the queue to what one read returned.

Reading is paused for several independent reasons (a queued pipelined request, an upstream
that cannot take more body, a body buffered while connecting); ``_pause``/``_resume`` keep
one bit per reason and touch the transport only when the set goes from empty to non-empty
and back.

One ``Deadline`` enforces whichever client timeout applies now: idle keep-alive, request
head (slowloris gets 408), request body idle and minimum rate, or a client that stopped
reading our response. A second one, ``up_timer``, serves the exchange's upstream timeouts;
both live as long as the connection, so a request arms no new timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Callable

from portico.codec.events import Data, Event, RequestHead
from portico.codec.parser import RequestParser
from portico.dataplane.context import ProxyContext
from portico.dataplane.exchange import Handler
from portico.dataplane.forwarding import ClientInfo
from portico.dataplane.pipeline import begin
from portico.dataplane.responses import error_response
from portico.dataplane.timers import Deadline
from portico.errors import ProtocolError

# Reasons reading from the client is paused (bits).
PAUSE_PIPELINE = 1  # a later request waits for the current one
PAUSE_UPSTREAM = 2  # the upstream socket's write buffer is full
PAUSE_BUFFER = 4  # body arriving faster than the upstream connection can be opened

# Client timer kinds.
T_NONE, T_IDLE, T_HEADER, T_BODY, T_SEND = range(5)


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_body_bytes",
        "_body_paused_at",
        "_body_paused_total",
        "_body_started",
        "_closed",
        "_corked",
        "_counted",
        "_discard",
        "_paused",
        "_pumping",
        "_queue",
        "_timer",
        "_timer_kind",
        "client",
        "ctx",
        "exchange",
        "on_made",
        "parser",
        "settings",
        "transport",
        "tunnel",
        "up_timer",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.settings = s = ctx.settings
        self.parser = RequestParser(
            max_target=s.max_target,
            max_header_bytes=s.max_header_bytes,
            max_headers=s.max_headers,
            max_body=s.max_body,
            drop_underscores=s.drop_underscores,
        )
        self.transport: asyncio.Transport | None = None
        self.exchange: Handler | None = None
        self.tunnel = False
        self._queue: deque[Event | ProtocolError] = deque()
        self._pumping = False
        self._discard = False
        self._paused = 0
        self._closed = False
        self._corked: list[bytes] | None = None
        self._counted: tuple[int, ...] = ()  # connection-limit keys to give back
        self._timer = Deadline(ctx.loop, self._on_timeout)
        self._timer_kind = T_NONE
        self.up_timer = Deadline(ctx.loop, self._on_upstream_timeout)
        self._body_started = 0.0
        self._body_bytes = 0
        self._body_paused_at = 0.0
        self._body_paused_total = 0.0
        # Set by a listener that needs a word on each connection (TLS: the scheme, the client
        # certificate): called once the client is known. A hook, not a subclass, so the class
        # stays closed to interpreted subclasses in the accelerated build.
        self.on_made: Callable[[ClientConnection, asyncio.BaseTransport], None] | None = None

    def __repr__(self) -> str:
        peer = f"{self.client.ip}:{self.client.port}" if hasattr(self, "client") else "?"
        return f"<ClientConnection {peer} exchange={self.exchange!r}>"

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        ip, port = (peer[0], peer[1]) if isinstance(peer, tuple) else ("unix", 0)
        self.client = ClientInfo(ip, port, self.ctx.snapshot.forwarding.trusts(ip))
        if self.on_made is not None:
            self.on_made(self, transport)
        limits = self.ctx.conn_limits
        if limits is not None:
            counted = limits.open(ip)
            if counted is None:
                # Over a connection limit: say so (503) and close, as politely as it gets.
                self._closed = True
                assert self.transport is not None
                self.transport.write(error_response(503, True))
                self.transport.close()
                return
            self._counted = counted
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ctx.connections.add(self)
        # Until the first byte, a new connection gets the head timeout (as nginx does).
        self._set_timer(T_HEADER, self.settings.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            ex = self.exchange
            if ex is not None:
                ex.tunnel_from_client(data)
            return
        if self.ctx.settings is not self.settings and self.exchange is None:
            self._reloaded()  # a request arriving after a reload is parsed with its limits
        try:
            events = self.parser.feed(data)
        except ProtocolError as exc:
            # Requests completed before the bad one are answered first, then the error.
            before = self.parser.complete_before_error()
            ex = self.exchange
            if not before and not self._queue and (ex is None or not ex.request_done):
                # The bad bytes belong to the request in progress (or the only one).
                self._protocol_error(exc)
                return
            self._queue.extend(before)
            self._queue.append(exc)
            self._pause(PAUSE_PIPELINE)
            self._pump()
            return
        if events:
            self._queue.extend(events)
            self._pump()
        if self._timer_kind == T_BODY:
            self._check_body_rate(len(data))
        elif self.parser.in_head and self._timer_kind != T_HEADER:
            self._set_timer(T_HEADER, self.settings.header_timeout)

    def eof_received(self) -> bool:
        # A half-close from the client ends the request stream. Finish what is in flight
        # (the response still goes out) only if the current request is complete.
        ex = self.exchange
        if ex is not None and ex.request_done and not self._queue and not ex.holding:
            ex.client_eof = True
            return True
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._timer.cancel()
        self.up_timer.cancel()
        self.ctx.connections.discard(self)
        if self._counted:
            limits = self.ctx.conn_limits
            if limits is not None:
                limits.close(self._counted)
            self._counted = ()
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.client_gone()

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.client_paused()
        self._set_timer(T_SEND, self.settings.send_timeout)

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.client_resumed()
        if self._timer_kind == T_SEND:
            self._restore_timer()

    # --- the request queue ------------------------------------------------------------------

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        q = self._queue
        try:
            while q:
                ev = q[0]
                t = type(ev)
                if t is RequestHead:
                    if self.exchange is not None or self._discard or self._closed:
                        break
                    q.popleft()
                    self._start(ev)  # type: ignore[arg-type]
                elif t is Data:
                    q.popleft()
                    if not self._discard and self.exchange is not None:
                        self.exchange.req.received_bytes += len(ev.data)  # type: ignore[union-attr]
                        self.exchange.on_request_data(ev.data)  # type: ignore[union-attr]
                elif isinstance(ev, ProtocolError):
                    if self.exchange is not None or self._discard:
                        break
                    q.clear()
                    self._protocol_error(ev)
                    return
                else:
                    q.popleft()
                    if self._discard:
                        self._discard = False
                        self._next_request()
                    elif self.exchange is not None:
                        self._body_done()
                        self.exchange.on_request_end()
        finally:
            self._pumping = False
        if q:
            self._pause(PAUSE_PIPELINE)
        elif self._paused & PAUSE_PIPELINE:
            self._resume(PAUSE_PIPELINE)

    def _start(self, head: RequestHead) -> None:
        if head.framing != "none":
            self._body_started = self.ctx.loop.time()
            self._body_bytes = 0
            self._body_paused_total = 0.0
            self._set_timer(T_BODY, self.settings.body_idle_timeout)
        else:
            self._set_timer(T_NONE, 0)
        ex = self.exchange = begin(self, head)
        ex.start()

    def _body_done(self) -> None:
        if self._timer_kind == T_BODY:
            self._set_timer(T_NONE, 0)

    def exchange_finished(self, keep_alive: bool) -> None:
        """Called by the exchange once its response is fully written (or failed cleanly)."""
        ex = self.exchange
        if self._closed:
            return
        if not keep_alive or self.ctx.closing or (ex is not None and ex.client_eof):
            self.exchange = None
            self.close()
            return
        if ex is not None and not ex.request_done:
            # Answered before the request body ended: drop the rest of the body, then go on.
            self._discard = True
            self.exchange = None
            return
        self._next_request()

    def _next_request(self) -> None:
        self.exchange = None
        if self.ctx.settings is not self.settings:
            self._reloaded()
        if self.parser.upgrade_pending:
            # The upstream declined the upgrade: what followed the head is plain HTTP again.
            leftover = self.parser.resume()
            if leftover:
                self.data_received(leftover)
                if self._closed:
                    return
        if not self._queue and not self.parser.in_head:
            self._set_timer(T_IDLE, self.settings.keepalive_timeout)
        self._pump()

    # --- writing ----------------------------------------------------------------------------

    def detach(self) -> None:
        """The current handler lets go of this connection (it is about to be aborted)."""
        self.exchange = None

    def take_upgrade_leftover(self) -> bytes:
        """Bytes the client sent after its Upgrade request: the start of the tunnel."""
        leftover = self.parser.upgrade_leftover
        self.parser.upgrade_leftover = b""
        return leftover

    def write(self, data: bytes) -> None:
        corked = self._corked
        if corked is not None:
            corked.append(data)
            return
        transport = self.transport
        if transport is not None and not self._closed:
            transport.write(data)

    def cork(self) -> None:
        """Collect writes until ``uncork``: a response head and a small body parsed from one
        upstream read then leave in one send() instead of two."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        corked = self._corked
        if corked is None:
            return
        self._corked = None
        if corked:
            self.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def close(self) -> None:
        """Close after what was written is flushed."""
        self.uncork()
        if not self._closed:
            self._closed = True
            self._timer.cancel()
            self.up_timer.cancel()
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Reset: used when a response already started cannot be completed honestly."""
        self._corked = None
        if self.transport is not None:
            self.transport.abort()
        self._closed = True

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the current response."""
        if self.exchange is None and not self._queue:
            self.close()

    def _protocol_error(self, exc: ProtocolError) -> None:
        # Framing can no longer be trusted: answer (unless a response is under way) and close.
        ex = self.exchange
        if ex is None or not ex.response_started:
            self.write(error_response(exc.status, True))
        if ex is not None:
            self.exchange = None
            ex.client_gone()
        self.close()

    # --- flow control -----------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
            if self._timer_kind == T_BODY:
                self._body_paused_at = self.ctx.loop.time()
                # A client we paused is not idle: body_idle restarts in _resume.
                self._timer.clear()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.resume_reading()
            if self._timer_kind == T_BODY:
                # Time spent paused by us is not the client's slowness.
                now = self.ctx.loop.time()
                self._body_paused_total += now - self._body_paused_at
                self._timer.set(self.settings.body_idle_timeout)

    def pause_for_upstream(self) -> None:
        self._pause(PAUSE_UPSTREAM)

    def resume_for_upstream(self) -> None:
        self._resume(PAUSE_UPSTREAM)

    def pause_for_buffer(self) -> None:
        self._pause(PAUSE_BUFFER)

    def resume_for_buffer(self) -> None:
        self._resume(PAUSE_BUFFER)

    # --- timeouts ---------------------------------------------------------------------------

    def _set_timer(self, kind: int, delay: float) -> None:
        self._timer_kind = kind
        if kind == T_NONE:
            self._timer.clear()
        else:
            self._timer.set(delay)

    def _restore_timer(self) -> None:
        ex = self.exchange
        if ex is not None and not ex.request_done and ex.head.framing != "none":
            self._set_timer(T_BODY, self.settings.body_idle_timeout)
            if self._paused:
                # Still paused by us: the body clock waits for _resume, as in _pause.
                self._timer.clear()
                self._body_paused_at = self.ctx.loop.time()
        elif ex is None:
            self._set_timer(T_IDLE, self.settings.keepalive_timeout)
        else:
            self._set_timer(T_NONE, 0)

    def _reloaded(self) -> None:
        """A reload swapped the settings: the next request on this connection runs on them."""
        self.settings = s = self.ctx.settings
        self.parser.set_limits(
            s.max_target, s.max_header_bytes, s.max_headers, s.max_body, s.drop_underscores
        )
        self.client.trusted = self.ctx.snapshot.forwarding.trusts(self.client.ip)

    def _check_body_rate(self, n: int) -> None:
        s = self.settings
        if not self._paused:  # this read may have paused us; then _resume re-arms it
            self._timer.set(s.body_idle_timeout)
        self._body_bytes += n
        if s.body_min_rate <= 0:
            return
        now = self.ctx.loop.time()
        elapsed = now - self._body_started - self._body_paused_total
        if elapsed > s.body_grace and self._body_bytes < s.body_min_rate * elapsed:
            self._timeout_response(408)

    def _on_timeout(self) -> None:
        kind = self._timer_kind
        self._timer_kind = T_NONE
        if kind == T_IDLE:
            self.close()
        elif kind in (T_HEADER, T_BODY):
            self._timeout_response(408)
        elif kind == T_SEND:
            # The client stopped reading our response: nothing honest can be sent any more.
            ex = self.exchange
            self.exchange = None
            if ex is not None:
                ex.client_gone()
            self.abort()

    def _timeout_response(self, status: int) -> None:
        ex = self.exchange
        if ex is None or not ex.response_started:
            self.write(error_response(status, True))
        if ex is not None:
            self.exchange = None
            ex.client_gone()
        self.close()

    def _on_upstream_timeout(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.on_upstream_timeout()
