"""The WAF's I/O: its log lines, and reading a request body before the handler starts.

Theory of operation. The WAF stage (runtime/waf.py) returns a ``WafCheck`` when it has
something to say. Decided already (no body, or phase 1 blocked): ``inspect`` logs it and
answers 403, or, in detect mode or below the threshold, runs the remaining stages and the
handler. Not yet decided (the request has a body): ``WafBodyExchange`` stands in for the
handler. It lets the client's body come in and feeds it to the check, keeping the bytes,
until ``body_limit`` bytes or the end of the body; reading then pauses, the check decides,
and either a 403 goes out or the handler starts and gets the kept bytes replayed, after
which every call goes straight to it (the rest of a larger body streams uninspected).
Memory per request is bounded by ``body_limit`` plus one read. A client that sent
``Expect: 100-continue`` is told to go on here, since the body is needed to decide.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from portico.codec.events import RequestHead
from portico.codec.writer import CONTINUE_100
from portico.dataplane.exchange import ClientSide, Handler, finish
from portico.runtime.request import RequestState
from portico.runtime.routes import CompiledRoute
from portico.runtime.waf import WafCheck, request_id

log = logging.getLogger("portico.waf")

Proceed = Callable[[ClientSide, RequestState, CompiledRoute, int], Handler]


def report(req: RequestState, check: WafCheck) -> None:
    """One line per request the rules matched: what was done and the rule ids."""
    v = check.verdict
    if v is None or not v.rules:
        return
    if v.block:
        what = "would block (detect mode)" if check.detect else f"blocked {v.status}"
        level = logging.WARNING
    else:
        what = "matched below threshold"
        level = logging.INFO
    if not log.isEnabledFor(level):
        return
    head = req.head
    route = req.route.name if req.route is not None else "-"
    log.log(
        level,
        "waf %s: %s %s route=%s client=%s request_id=%s rules=%s",
        what,
        head.method.decode("latin-1"),
        head.target[:200].decode("latin-1"),
        route,
        req.client_ip,
        request_id(req).decode("latin-1") if v.block else (req.request_id or b"-").decode(),
        ",".join(str(r) for r in v.rules),
    )


def report_response(req: RequestState, check: WafCheck) -> None:
    """The response phases' matches (``inspect_response``): logged, never blocked, since
    the response was already on its way."""
    v = check.response
    if v is None or not v.rules:
        return
    what = "response over the outbound threshold" if v.block else "response matched"
    head = req.head
    log.warning(
        "waf %s (logged only): %s %s route=%s status=%d request_id=%s rules=%s",
        what,
        head.method.decode("latin-1"),
        head.target[:200].decode("latin-1"),
        req.route.name if req.route is not None else "-",
        req.status,
        (req.request_id or b"-").decode("latin-1"),
        ",".join(str(r) for r in v.rules),
    )


def inspect(
    conn: ClientSide,
    req: RequestState,
    route: CompiledRoute,
    after: int,
    check: WafCheck,
    proceed: Proceed,
) -> Handler:
    """What the pipeline calls for a stage's ``WafCheck``; ``after``: the next stage."""
    check.sink = report_response
    if check.verdict is None:
        return WafBodyExchange(conn, req, route, after, check, proceed)
    report(req, check)
    if check.blocks:
        return conn.ctx.local(conn, req, route, check.reply(req), None)
    return proceed(conn, req, route, after)


class WafBodyExchange:
    """Reads up to the check's limit of body, then hands over to the 403 or the handler."""

    __slots__ = (
        "_ended",
        "_eof",
        "_gone",
        "_kept",
        "_paused",
        "after",
        "check",
        "conn",
        "head",
        "inner",
        "proceed",
        "req",
        "route",
    )

    def __init__(
        self,
        conn: ClientSide,
        req: RequestState,
        route: CompiledRoute,
        after: int,
        check: WafCheck,
        proceed: Proceed,
    ) -> None:
        self.conn = conn
        self.req = req
        self.head: RequestHead = req.head
        self.route = route
        self.after = after
        self.check = check
        self.proceed = proceed
        self.inner: Handler | None = None
        self._kept: list[bytes] = []
        self._ended = False
        self._eof = False
        self._gone = False
        self._paused = False

    def __repr__(self) -> str:
        return f"<WafBodyExchange {self.head.method.decode()} inner={self.inner!r}>"

    @property
    def request_done(self) -> bool:
        inner = self.inner
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
        inner = self.inner
        return inner.holding if inner is not None else not self._gone

    @property
    def client_eof(self) -> bool:
        inner = self.inner
        return inner.client_eof if inner is not None else self._eof

    @client_eof.setter
    def client_eof(self, value: bool) -> None:
        if self.inner is not None:
            self.inner.client_eof = value
        self._eof = value

    def start(self) -> None:
        head = self.head
        if head.expect_continue:
            # The decision needs the body: ask for it now (and only once: the proxy would
            # send its own 100 when it connects).
            head.expect_continue = False
            self.conn.write(CONTINUE_100)

    def _decide(self) -> None:
        conn = self.conn
        req = self.req
        check = self.check
        check.decide()
        report(req, check)
        req.now = conn.ctx.loop.time()
        if check.blocks:
            inner = conn.ctx.local(conn, req, self.route, check.reply(req), None)
        else:
            inner = self.proceed(conn, req, self.route, self.after)
        if self._paused:
            self._paused = False
            conn.resume_for_buffer()
        self.inner = inner
        if self._eof:
            inner.client_eof = True
        inner.start()
        kept, self._kept = self._kept, []
        for data in kept:
            inner.on_request_data(data)
        if self._ended:
            inner.on_request_end()

    # --- the connection's calls ---------------------------------------------------------------

    def on_request_data(self, data: bytes) -> None:
        inner = self.inner
        if inner is not None:
            inner.on_request_data(data)
            return
        self._kept.append(data)
        if self.check.feed(data):
            # Enough to decide: stop reading until the handler takes the kept bytes.
            self._paused = True
            self.conn.pause_for_buffer()
            self._decide()

    def on_request_end(self) -> None:
        self._ended = True
        inner = self.inner
        if inner is not None:
            inner.on_request_end()
        elif not self._gone:
            self._decide()

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
        if not self.req.status:
            self.req.status = 499
        finish(self.conn, self.req)

    def on_upstream_timeout(self) -> None:
        if self.inner is not None:
            self.inner.on_upstream_timeout()
