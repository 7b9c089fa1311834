"""A request held by a stage before its handler starts: delayed, or waiting for a decision.

Theory of operation. A stage's ``on_request`` may return a ``Hold`` (runtime.stages): wait
``delay`` seconds (a rate limit's nginx-style delay), or wait until an I/O stage (the
Redis-backed rate limit) calls back. The pipeline then hands the connection this
``HeldExchange`` in place of a handler. While held, it reads nothing more from the client
(reading is paused, as while an upstream connection opens) and keeps the few body bytes
already parsed. When the hold ends it runs the remaining stages (``proceed``), starts the
real handler, replays the body it kept, and from then on forwards every call to it, so the
connection never learns that the request was held. A client that leaves while held
finishes the request as 499 and the timer or the late decision is ignored.
"""

from __future__ import annotations

from collections.abc import Callable

from portico.codec.events import RequestHead
from portico.dataplane.exchange import ClientSide, Handler, finish
from portico.runtime.request import RequestState
from portico.runtime.routes import CompiledRoute
from portico.runtime.stages import Hold, LocalReply

Proceed = Callable[[ClientSide, RequestState, CompiledRoute, int], Handler]


class StandIn:
    """Stands in for a request's handler until a decision lets the real one start (a hold
    here, the WAF's body check in dataplane/wafbody.py). It keeps what the connection
    delivers meanwhile, answers the connection's questions as a handler would, and once
    ``hand_over`` starts the real handler, replays what it kept and forwards every call, so
    the connection never learns there was a stand-in. A client that leaves first finishes
    the request as 499."""

    __slots__ = ("_ended", "_eof", "_gone", "_kept", "conn", "head", "inner", "proceed", "req",
                 "route")  # fmt: skip

    def __init__(
        self, conn: ClientSide, req: RequestState, route: CompiledRoute, proceed: Proceed
    ) -> None:
        self.conn = conn
        self.req = req
        self.head: RequestHead = req.head
        self.route = route
        self.proceed = proceed
        self.inner: Handler | None = None
        self._kept: list[bytes] = []
        self._ended = False  # the connection's on_request_end (bodiless requests get it too)
        self._eof = False
        self._gone = False

    # The connection reads these; once the real handler runs they are its own.
    @property
    def request_done(self) -> bool:
        inner = self.inner
        # The connection delivered the whole body to us: it must not wait for more.
        return self._ended or (inner is not None and inner.request_done)

    @request_done.setter
    def request_done(self, value: bool) -> None:
        self._ended = value

    @property
    def response_started(self) -> bool:
        inner = self.inner
        return inner is not None and inner.response_started

    @response_started.setter
    def response_started(self, value: bool) -> None:
        pass  # only the real handler starts a response

    @property
    def holding(self) -> bool:
        """Still held by a stage (nothing sent anywhere): a client that leaves ends it."""
        inner = self.inner
        return inner.holding if inner is not None else not self._gone

    @property
    def client_eof(self) -> bool:
        inner = self.inner
        return inner.client_eof if inner is not None else self._eof

    @client_eof.setter
    def client_eof(self, value: bool) -> None:
        inner = self.inner
        if inner is not None:
            inner.client_eof = value
        self._eof = value

    def hand_over(self, inner: Handler) -> None:
        """Start the real handler (or a local reply) and give it what was kept."""
        self.inner = inner
        if self._eof:
            inner.client_eof = True
        inner.start()
        kept, self._kept = self._kept, []
        for data in kept:
            inner.on_request_data(data)
        if self._ended:
            inner.on_request_end()

    def abandon(self) -> None:
        """The client left before the hand-over: drop what was pending (a subclass's)."""

    # --- the connection's calls ---------------------------------------------------------------

    def on_request_data(self, data: bytes) -> None:
        inner = self.inner
        if inner is not None:
            inner.on_request_data(data)
        else:
            self._kept.append(data)  # bounded: reading is paused, this is one read's worth

    def on_request_end(self) -> None:
        self._ended = True
        inner = self.inner
        if inner is not None:
            inner.on_request_end()

    def tunnel_from_client(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.tunnel_from_client(data)

    def client_paused(self) -> None:
        if self.inner is not None:
            self.inner.client_paused()

    def client_resumed(self) -> None:
        if self.inner is not None:
            self.inner.client_resumed()

    def client_gone(self) -> None:
        inner = self.inner
        if inner is not None:
            inner.client_gone()
            return
        if self._gone:
            return
        self._gone = True
        self.abandon()
        if not self.req.status:
            self.req.status = 499
        finish(self.conn, self.req)

    def on_upstream_timeout(self) -> None:
        if self.inner is not None:
            self.inner.on_upstream_timeout()


class HeldExchange(StandIn):
    __slots__ = ("_timer", "first", "hold")

    def __init__(
        self,
        conn: ClientSide,
        req: RequestState,
        route: CompiledRoute,
        first: int,
        hold: Hold,
        proceed: Proceed,
    ) -> None:
        super().__init__(conn, req, route, proceed)
        self.first = first
        self.hold = hold
        self._timer: object = None

    def __repr__(self) -> str:
        return f"<HeldExchange {self.head.method.decode()} inner={self.inner!r}>"

    def start(self) -> None:
        self.conn.pause_for_buffer()
        self._wait(self.hold)

    def _wait(self, hold: Hold) -> None:
        if hold.start is not None:
            hold.start(self._resume)
        else:
            self._timer = self.conn.ctx.loop.call_later(hold.delay, self._resume, None)

    def _resume(self, outcome: LocalReply | Hold | None) -> None:
        if self._gone or self.inner is not None:
            return  # the client left, or a late second answer
        self._timer = None
        if type(outcome) is Hold:
            self._wait(outcome)
            return
        conn = self.conn
        self.req.now = conn.ctx.loop.time()  # later stages decide at the time they run
        if outcome is None:
            inner = self.proceed(conn, self.req, self.route, self.first)
            if type(inner) is HeldExchange:
                # Held again (shedding waits for room): wait here rather than nest.
                self.first = inner.first
                self._wait(inner.hold)
                return
        else:
            inner = conn.ctx.local(conn, self.req, self.route, outcome, None)  # type: ignore[arg-type]
        conn.resume_for_buffer()
        self.hand_over(inner)

    def abandon(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()  # type: ignore[attr-defined]
