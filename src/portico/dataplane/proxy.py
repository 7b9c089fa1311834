"""The proxy handler: one request proxied to one upstream, streamed both ways.

Theory of operation. ``start`` takes the route's target (or a share of its split), starts a
mirror copy if the route has one, asks the balancer for an endpoint and takes
a warm connection from that endpoint's pool. With a warm connection the request head is
written at once, inside the same callback that parsed it: the common keep-alive path creates
no task and no timer. Only a cold start (connect) runs as a task.

Body bytes flow by callbacks, never through queues: client data is written to the upstream
transport as it arrives and upstream data to the client transport. When either transport's
write buffer fills, ``pause_writing`` on that side pauses reading on the other side, so no
buffer in Portico grows with the size of a body.

The response head goes through the route's response stages (an editable header list) before
it is written once; the body through the route's body filters, chunk by chunk.

Failure rules, in one place (``_fail``):
* nothing of the response has reached the client yet: answer with the error's status
  (502/503/504) through ``responses.response_for``;
* the response has started: abort the client connection, so a truncated body is never
  presented as complete;
* a pooled connection that turned out dead before answering a single byte is retried once
  on a fresh connection when replaying is safe (no request body, or an idempotent method
  whose body has not started to flow); see ``attempts`` for retries to other endpoints.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from portico.codec.events import Data, EndOfMessage, Event, ResponseHead
from portico.codec.writer import CONTINUE_100, LAST_CHUNK, chunk
from portico.dataplane import forwarding, outliers
from portico.dataplane.affinity import cookie_value, hash_key, sticky_cookie_value
from portico.dataplane.attempts import AttemptsMixin
from portico.dataplane.exchange import ClientSide, finish, request_id_field
from portico.dataplane.mirror import MirrorCopy, start_mirror
from portico.dataplane.responses import response_for
from portico.dataplane.tunnel import U_BODY, U_COLD, U_HEADER, U_NONE, TunnelMixin
from portico.dataplane.upstream import EndpointPool, UpstreamConnection
from portico.errors import (
    BadResponse,
    NoHealthyEndpoint,
    PorticoError,
    ProtocolError,
    ResponseTimeout,
    UpstreamError,
)
from portico.policy.balancers import record_latency
from portico.policy.retry import classify
from portico.runtime.request import RequestState
from portico.runtime.routes import CompiledRoute, RouteTarget
from portico.runtime.stages import BodyFilter

if TYPE_CHECKING:
    from portico.runtime.endpoint import Endpoint
    from portico.runtime.snapshot import Service

# Request body bytes held while the upstream connection is being opened. Beyond this the
# client is paused; 64 KiB matches the transports' default write high-water mark.
CONNECT_BUFFER_LIMIT = 65536


class ProxyExchange(AttemptsMixin, TunnelMixin):
    __slots__ = (
        "_attempt",
        "_body_count",
        "_body_sent",
        "_buffer",
        "_buffered",
        "_client_chunked",
        "_deadline_at",
        "_filters",
        "_held",
        "_holds_retry",
        "_keep_alive",
        "_mirror",
        "_retried",
        "_reused",
        "_sent_at",
        "_set_cookie",
        "_timer_kind",
        "_tried",
        "client_eof",
        "conn",
        "done",
        "endpoint",
        "head",
        "head_bytes",
        "pool",
        "req",
        "request_done",
        "response_started",
        "route",
        "service",
        "target",
        "upstream",
    )

    def __init__(self, conn: ClientSide, req: RequestState, route: CompiledRoute) -> None:
        self.conn = conn
        self.req = req
        self.route = route
        self.head = head = req.head
        self.target: RouteTarget | None = None
        self.upstream: UpstreamConnection | None = None
        self.endpoint: Endpoint | None = None
        self.service: Service | None = None
        self.pool: EndpointPool | None = None
        self.head_bytes = b""
        self.request_done = False
        self.response_started = False
        self.done = False
        self.client_eof = False
        self._buffer: list[bytes] | None = None
        self._buffered = 0
        self._client_chunked = False
        self._keep_alive = head.keep_alive
        self._retried = False
        self._reused = False
        self._attempt = 1
        self._tried: list[Endpoint] = []
        self._body_sent = False
        self._holds_retry = False
        self._sent_at = 0.0
        self._set_cookie = False
        self._timer_kind = U_NONE
        self._deadline_at = float("inf")
        self._filters: list[BodyFilter] | None = None
        self._body_count = 0
        self._held = False  # held for a cold start: the deadline has been running
        self._mirror: MirrorCopy | None = None

    def __repr__(self) -> str:
        ep = self.endpoint.label if self.endpoint else "-"
        return f"<ProxyExchange {self.head.method.decode()} {self.head.target[:60]!r} -> {ep}>"

    @property
    def status(self) -> int:
        return self.req.status

    @property
    def holding(self) -> bool:
        """Held for a cold start: nothing has been sent upstream yet."""
        return self._timer_kind == U_COLD

    # --- start ------------------------------------------------------------------------------

    def start(self) -> None:
        route = self.route
        split = route.split
        target = route.target if split is None else split.pick(self.req.client_ip)
        assert target is not None
        self.target = target
        self.service = target.service  # type: ignore[assignment]
        self.req.service = target.service.name  # type: ignore[attr-defined]
        # The deadline runs from the end of the request, as Envoy's route timeout does: a
        # long upload is bounded by the client body timeouts, not by the deadline.
        if self.head.framing == "none":
            self._deadline_at = self.req.started_at + target.deadline
        if route.mirror is not None and route.mirror.take():
            self._mirror = start_mirror(self.conn, self.req, route.mirror)
        if self.head.framing != "none":
            self._buffer = []
        self._dispatch(None)

    def _dispatch(self, last_error: PorticoError | None) -> None:
        """Choose an endpoint (not one already tried) and send the request to it."""
        conn = self.conn
        service = self.service
        assert service is not None
        head = self.head
        candidates = service.candidates(conn.ctx.loop.time(), self._tried)
        endpoint = None
        req = self.req
        if service.sticky is not None:
            endpoint = service.sticky.pick(cookie_value(head, service.sticky_cookie), candidates)
            self._set_cookie = endpoint is None
        if endpoint is None:
            key = None
            if service.keyed:
                key = hash_key(service.hash_key, head, req.target, req.client_ip)
            endpoint = service.balancer.pick(candidates, key)
        if endpoint is None:
            if (
                service.demand is not None
                and last_error is None
                and not self._tried
                and service.unavailable is None  # crash-looping: no instance is coming
            ):
                self._hold_for_instance(service)
                return
            why = f"no available endpoint in {service.name}"
            self._fail(last_error or NoHealthyEndpoint(why, service.unavailable))
            return
        self.endpoint = endpoint
        endpoint.in_flight += 1
        endpoint.requests += 1
        req.tries = self._attempt
        self.head_bytes = forwarding.request_head(
            head,
            req.target,
            req.host,
            conn.client,
            conn.ctx.snapshot.forwarding,
            self.route.host_header or service.host_override,
            endpoint.authority,
        )
        self.pool = pool = conn.ctx.pools.get(
            endpoint, service.pool_max_idle, service.pool_idle_timeout
        )
        upstream = pool.take_idle()
        if upstream is not None:
            self._reused = True
            self._attach(upstream)
        else:
            self._reused = False
            conn.ctx.loop.create_task(self._connect())

    def _hold_for_instance(self, service: Service) -> None:
        """Scale from zero: ask for an instance and wait (bounded) until one is ready."""
        self._held = True
        service.waiters.append(self._instance_ready)
        self._arm(U_COLD, service.cold_start_timeout)
        service.demand()  # type: ignore[misc]

    def _instance_ready(self) -> None:
        if self.done:
            return
        self._disarm()
        why = self.service.unavailable if self.service is not None else None
        self._dispatch(NoHealthyEndpoint("no instance became ready", why))

    async def _connect(self) -> None:
        pool = self.pool
        assert pool is not None and self.target is not None
        try:
            upstream = await pool.connect(self.target.connect_timeout)
        except UpstreamError as exc:
            if not self.done and pool is self.pool:
                self._fail(exc)
            return
        if self.done or pool is not self.pool:
            upstream.release()
            return
        self._attach(upstream)

    def _attach(self, upstream: UpstreamConnection) -> None:
        self.upstream = upstream
        upstream.bind(self, self.head.method)
        upstream.write(self.head_bytes)
        head = self.head
        if head.framing != "none":
            if head.expect_continue and not self.response_started:
                self.conn.write(CONTINUE_100)
            buffered = self._buffer
            self._buffer = None
            if buffered:
                self._body_sent = True
                chunked = head.framing == "chunked"
                for data in buffered:
                    upstream.write(chunk(data) if chunked else data)
                if self._buffered > CONNECT_BUFFER_LIMIT:
                    self.conn.resume_for_buffer()
                self._buffered = 0
            if self.request_done and head.framing == "chunked":
                upstream.write(LAST_CHUNK)
        # Always: the upstream time goes to the metrics and the access log as well.
        self._sent_at = self.conn.ctx.loop.time()
        self._arm(U_HEADER, self._header_timeout())

    def _header_timeout(self) -> float:
        target = self.target
        assert target is not None
        if self._attempt == 1 and not self._held and self.head.framing == "none":
            return target.first_try_timeout
        per_try: float = target.retry.per_try_timeout or target.response_header_timeout  # type: ignore[attr-defined]
        # The request deadline bounds every try: the last one gets only what is left.
        left = self._deadline_at - self.conn.ctx.loop.time()
        return per_try if per_try < left else max(left, 0.0)

    # --- request body (from the client connection) -------------------------------------------

    def on_request_data(self, data: bytes) -> None:
        max_body = self.route.max_body
        if max_body is not None:
            self._body_count += len(data)
            if self._body_count > max_body:
                self._fail(ProtocolError("body too large for route", 413))
                return
        if self._mirror is not None:
            self._mirror.feed(data)
        upstream = self.upstream
        if upstream is not None:
            self._body_sent = True
            upstream.write(chunk(data) if self.head.framing == "chunked" else data)
            if self._timer_kind == U_HEADER:
                self._arm(U_HEADER, self._header_timeout())
            return
        buf = self._buffer
        if buf is None:
            return  # already failed; the body is being discarded
        buf.append(data)
        self._buffered += len(data)
        if self._buffered > CONNECT_BUFFER_LIMIT:
            self.conn.pause_for_buffer()

    def on_request_end(self) -> None:
        self.request_done = True
        target = self.target
        if target is not None and self.head.framing != "none":
            self._deadline_at = self.conn.ctx.loop.time() + target.deadline
            if self._timer_kind == U_HEADER:
                self._arm(U_HEADER, self._header_timeout())
        mirror = self._mirror
        if mirror is not None:
            self._mirror = None
            mirror.end()
        upstream = self.upstream
        if upstream is not None and self.head.framing == "chunked":
            upstream.write(LAST_CHUNK)

    # --- response (from the upstream connection) ---------------------------------------------

    def on_response_events(self, events: list[Event]) -> None:
        conn = self.conn
        conn.cork()
        try:
            self._relay(events)
        finally:
            conn.uncork()

    def _relay(self, events: list[Event]) -> None:
        conn = self.conn
        source = self.upstream
        for ev in events:
            t = type(ev)
            if t is Data:
                data = ev.data  # type: ignore[union-attr]
                filters = self._filters
                if filters is not None:
                    for f in filters:
                        data = f.feed(data)
                    if not data:
                        continue
                self.req.sent_bytes += len(data)
                conn.write(chunk(data) if self._client_chunked else data)
                if self._timer_kind == U_BODY:
                    conn.up_timer.set(self.target.body_idle_timeout)  # type: ignore[union-attr]
            elif t is ResponseHead:
                self._on_head(ev)  # type: ignore[arg-type]
                if self.upstream is not source:
                    # Retried elsewhere (a status in retry_on): the body and end of this
                    # response, parsed from the same read, belong to a discarded answer.
                    return
            elif t is EndOfMessage:
                self._complete()
            if self.done:
                return

    def _on_head(self, resp: ResponseHead) -> None:
        conn = self.conn
        head = self.head
        status = resp.status
        if status < 200:
            if status == 101:
                if not head.upgrade:
                    self._fail(BadResponse("upstream switched protocols without being asked"))
                    return
                self.req.status = 101
                self.response_started = True
                self._disarm()
                self._write_head(resp)
            elif status != 100 and head.version == b"1.1":
                # 103 Early Hints and friends go through to HTTP/1.1 clients; 100 Continue
                # was already sent by Portico itself when the body was first wanted.
                self._write_head(resp)
            return
        service = self.service
        endpoint = self.endpoint
        assert service is not None and endpoint is not None
        loop = conn.ctx.loop
        now = loop.time()
        up_time = self.req.upstream_time = now - self._sent_at
        if service.measures_latency:
            record_latency(endpoint, up_time, now)
        if service.latencies is not None:
            service.latencies.append(up_time)
        if service.shed_window is not None:
            service.shed_window.add(up_time)
        if status >= 500:
            outliers.report(service, endpoint, False, f"status {status}", loop)
            retry_on = self.target.retry.retry_on  # type: ignore[union-attr]
            if (
                status in retry_on
                and self._may_retry(status, True)
                # With no endpoint left to try, this answer is the best there is: passing
                # it on beats a 502 of Portico's own that hides the backend's status.
                and service.candidates(loop.time(), [*self._tried, endpoint])
            ):
                self._retry(None)
                return
        elif service.outlier is not None:
            outliers.report(service, endpoint, True, "", loop)
        req = self.req
        req.status = status
        req.upstream = endpoint.label
        self.response_started = True
        framing = resp.framing
        route = self.route
        if self._set_cookie and service.sticky is not None:
            req.set_cookie = sticky_cookie_value(
                service.sticky_cookie, service.sticky.value_for(endpoint), service.sticky_max_age
            )
        stages = route.response_stages
        if stages:
            tokens = resp.connection_tokens
            if tokens:
                # Fields the backend named in Connection are hop-by-hop: drop them before the
                # stages run, or a header a rule sets would be dropped with them.
                resp.headers = [(n, v) for n, v in resp.headers if n.lower() not in tokens]
                resp.connection_tokens = frozenset()
            for stage in stages:
                stage.on_response(req, status, resp.headers)
        if route.body_stages and framing != "none":
            filters = [
                f
                for f in (s.body_filter(req, status, resp.headers) for s in route.body_stages)
                if f is not None
            ]
            if filters:
                self._filters = filters
                framing = "close"  # the length changes: re-frame as chunked (or close for 1.0)
        client_11 = head.version == b"1.1"
        chunked = client_11 and framing in ("chunked", "close")
        keep = self._keep_alive and not (framing in ("chunked", "close") and not client_11)
        if conn.ctx.closing or not self.request_done:
            # Answered before the request body ended (e.g. an early 413): rather than read and
            # discard an unknown amount of body, close after this response.
            keep = False
        self._keep_alive = keep
        self._client_chunked = chunked
        self._write_head(resp, chunked=chunked, keep_alive=keep)
        upstream = self.upstream
        if upstream is not None and (not resp.keep_alive or framing == "close"):
            upstream.reusable = False
        if framing != "none":
            self._arm(U_BODY, self.target.body_idle_timeout)  # type: ignore[union-attr]
        else:
            self._disarm()

    def _write_head(
        self,
        resp: ResponseHead,
        *,
        chunked: bool = False,
        keep_alive: bool = True,
    ) -> None:
        conn = self.conn
        conn.write(
            forwarding.response_head(
                resp,
                chunked=chunked,
                keep_alive=keep_alive,
                client_version=self.head.version,
                via=conn.ctx.snapshot.forwarding.via,
            )
        )

    def _complete(self) -> None:
        filters = self._filters
        if filters is not None:
            tail = b""
            for f in filters:  # each filter flushes its rest through the ones after it
                if tail:
                    tail = f.feed(tail)
                tail += f.end()
            if tail:
                self.req.sent_bytes += len(tail)
                self.conn.write(chunk(tail) if self._client_chunked else tail)
        if self._client_chunked:
            self.conn.write(LAST_CHUNK)
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            if not self.request_done:
                upstream.reusable = False  # the upstream answered before reading the body
            upstream.release()
        self._finish(self._keep_alive)

    # --- flow control -----------------------------------------------------------------------

    def on_upstream_pause(self) -> None:
        self.conn.pause_for_upstream()

    def on_upstream_resume(self) -> None:
        self.conn.resume_for_upstream()

    def client_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()
            if self._timer_kind == U_BODY:
                self.conn.up_timer.clear()  # the client's send timeout covers this wait

    def client_resumed(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()
            if self._timer_kind == U_BODY:
                self.conn.up_timer.set(self.target.body_idle_timeout)  # type: ignore[union-attr]

    # --- timers -----------------------------------------------------------------------------

    def _arm(self, kind: int, delay: float) -> None:
        self._timer_kind = kind
        self.conn.up_timer.set(delay)

    def _disarm(self) -> None:
        self._timer_kind = U_NONE
        self.conn.up_timer.clear()

    def on_upstream_timeout(self) -> None:
        kind = self._timer_kind
        self._timer_kind = U_NONE
        if kind == U_HEADER:
            if self.conn.ctx.loop.time() >= self._deadline_at:
                self._fail(ResponseTimeout("request deadline passed"))
                return
            self._fail(ResponseTimeout("upstream did not answer in time"))
        elif kind == U_BODY:
            self._fail(ResponseTimeout("upstream stalled"))
        elif kind == U_COLD:
            service = self.service
            if service is not None and self._instance_ready in service.waiters:
                service.waiters.remove(self._instance_ready)
            self._fail(NoHealthyEndpoint("no instance became ready in time"))

    # --- failure and completion -------------------------------------------------------------

    def on_upstream_error(self, error: UpstreamError) -> None:
        self._fail(error)

    def _fail(self, error: PorticoError) -> None:
        if self.done:
            return
        if self._can_retry_fresh(error):
            self._retried = True
            self._reused = False
            assert self.upstream is not None
            self.upstream.abort()
            self.upstream = None
            self._disarm()
            self.conn.ctx.loop.create_task(self._connect())
            return
        if isinstance(error, UpstreamError) and self.endpoint is not None:
            assert self.service is not None
            outliers.report(self.service, self.endpoint, False, error.reason, self.conn.ctx.loop)
            if not self.response_started and self._may_retry(classify(error), error.request_sent):
                self._retry(error)
                return
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.abort()
        self._buffer = None
        if self.response_started:
            self._keep_alive = False
            self._finish(False, abort=True)
            return
        self.req.status = error.status
        keep = (
            self._keep_alive
            and not self.conn.ctx.closing
            and (self.request_done or self.head.framing == "none")
        )
        response = response_for(error, close=not keep, request_id=request_id_field(self.req))
        # The access log counts body bytes sent, Portico's own error bodies included.
        self.req.sent_bytes = len(response) - response.index(b"\r\n\r\n") - 4
        self.conn.write(response)
        self._finish(keep)

    def _drop_mirror(self) -> None:
        mirror = self._mirror
        if mirror is not None:
            self._mirror = None
            mirror.drop()

    def _finish(self, keep_alive: bool, abort: bool = False) -> None:
        if self.done:
            return
        self.done = True
        if self._mirror is not None:
            self._drop_mirror()
        self._disarm()
        if self._holds_retry:
            self._release_retry()
        ep = self.endpoint
        if ep is not None:
            ep.in_flight -= 1
            self.req.upstream = ep.label
        finish(self.conn, self.req)
        if abort:
            conn = self.conn
            conn.detach()
            conn.abort()
            return
        self.conn.exchange_finished(keep_alive)

    def client_gone(self) -> None:
        """The client connection closed or was closed under us."""
        if self.done:
            return
        self.done = True
        self._drop_mirror()
        if self._timer_kind == U_COLD and self.service is not None:
            with contextlib.suppress(ValueError):  # no longer waiting: release the hold
                self.service.waiters.remove(self._instance_ready)
        self._disarm()
        self._release_retry()
        self._buffer = None
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            if upstream.tunnel:
                upstream.close()  # let what the client sent last reach the backend
            else:
                upstream.abort()
        ep = self.endpoint
        if ep is not None:
            ep.in_flight -= 1
            self.req.upstream = ep.label
        if self.req.status != 101:  # a client closing its tunnel is the tunnel's normal end
            # nginx's "client closed request", also when the response had started: a
            # download the client abandoned must not look like one it received whole.
            self.req.status = 499
        finish(self.conn, self.req)
