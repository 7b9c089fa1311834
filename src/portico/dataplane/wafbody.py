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

from portico.codec.writer import CONTINUE_100
from portico.dataplane.exchange import ClientSide, Handler
from portico.dataplane.hold import Proceed, StandIn
from portico.runtime.request import RequestState
from portico.runtime.routes import CompiledRoute
from portico.runtime.waf import WafCheck, request_id

log = logging.getLogger("portico.waf")


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


class WafBodyExchange(StandIn):
    """Reads up to the check's limit of body, then hands over to the 403 or the handler."""

    __slots__ = ("_paused", "after", "check")

    def __init__(
        self,
        conn: ClientSide,
        req: RequestState,
        route: CompiledRoute,
        after: int,
        check: WafCheck,
        proceed: Proceed,
    ) -> None:
        super().__init__(conn, req, route, proceed)
        self.after = after
        self.check = check
        self._paused = False

    def __repr__(self) -> str:
        return f"<WafBodyExchange {self.head.method.decode()} inner={self.inner!r}>"

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
        self.hand_over(inner)

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
        super().on_request_end()
        if self.inner is None and not self._gone:
            self._decide()
