"""The exchange: one request proxied to one upstream, streamed both ways.

Theory of operation. ``start`` routes the request, asks the balancer for an endpoint and takes
a warm connection from that endpoint's pool. With a warm connection the request head is
written at once, inside the same callback that parsed it: the common keep-alive path creates
no task and no timer. Only a cold start (connect) runs as a task.

Body bytes flow by callbacks, never through queues: client data is written to the upstream
transport as it arrives and upstream data to the client transport. When either transport's
write buffer fills, ``pause_writing`` on that side pauses reading on the other side, so no
buffer in Portico grows with the size of a body.

Failure rules, in one place (``_fail``):
* nothing of the response has reached the client yet: answer with the error's status
  (502/503/504) through ``responses.response_for``;
* the response has started: abort the client connection, so a truncated body is never
  presented as complete;
* a pooled connection that turned out dead before answering a single byte is retried once
  on a fresh connection when replaying is safe (no request body, or an idempotent method
  whose body has not started to flow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from portico.codec.events import Data, EndOfMessage, Event, RequestHead, ResponseHead
from portico.codec.writer import CONTINUE_100, LAST_CHUNK, chunk
from portico.dataplane import forwarding, outliers
from portico.dataplane.affinity import cookie_value, hash_key, set_cookie_line
from portico.dataplane.responses import response_for
from portico.dataplane.upstream import EndpointPool, UpstreamConnection
from portico.errors import (
    BadResponse,
    NoHealthyEndpoint,
    NoRoute,
    PorticoError,
    ProtocolError,
    ResponseTimeout,
    UpstreamError,
)
from portico.policy.balancers import record_latency
from portico.policy.retry import Failure, classify, is_idempotent

if TYPE_CHECKING:
    from portico.dataplane.connection import ClientConnection
    from portico.runtime.endpoint import Endpoint
    from portico.runtime.snapshot import Service

# Request body bytes held while the upstream connection is being opened. Beyond this the
# client is paused; 64 KiB matches the transports' default write high-water mark.
CONNECT_BUFFER_LIMIT = 65536

U_NONE, U_HEADER, U_BODY, U_COLD = range(4)


class Exchange:
    __slots__ = (
        "_attempt",
        "_body_sent",
        "_buffer",
        "_buffered",
        "_client_chunked",
        "_holds_retry",
        "_host",
        "_keep_alive",
        "_retried",
        "_reused",
        "_sent_at",
        "_set_cookie",
        "_started_at",
        "_target",
        "_timer_kind",
        "_tried",
        "client_eof",
        "conn",
        "done",
        "endpoint",
        "head",
        "head_bytes",
        "pool",
        "request_done",
        "response_started",
        "sent_bytes",
        "service",
        "status",
        "upstream",
    )

    def __init__(self, conn: ClientConnection, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        self.upstream: UpstreamConnection | None = None
        self.endpoint: Endpoint | None = None
        self.service: Service | None = None
        self.pool: EndpointPool | None = None
        self.head_bytes = b""
        self.request_done = False
        self.response_started = False
        self.done = False
        self.client_eof = False
        self.status = 0
        self.sent_bytes = 0
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
        self._target = head.target
        self._host = head.host
        self._timer_kind = U_NONE
        self._started_at = conn.ctx.loop.time() if conn.ctx.access_log is not None else 0.0

    def __repr__(self) -> str:
        ep = self.endpoint.label if self.endpoint else "-"
        return f"<Exchange {self.head.method.decode()} {self.head.target[:60]!r} -> {ep}>"

    # --- start ------------------------------------------------------------------------------

    def start(self) -> None:
        head = self.head
        target, host = head.target, head.host
        if target[:1] != b"/" and target != b"*":
            split = forwarding.split_absolute_form(target)
            if split is None:
                self._fail(ProtocolError("bad request target", 400))
                return
            target, host = split
        self._target, self._host = target, host
        service = self.conn.ctx.snapshot.routes.match(host, target)
        if service is None:
            self._fail(NoRoute("no route matches"))
            return
        self.service = service
        if head.framing != "none":
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
        if service.sticky is not None:
            endpoint = service.sticky.pick(cookie_value(head, service.sticky_cookie), candidates)
            self._set_cookie = endpoint is None
        if endpoint is None:
            key = None
            if service.keyed:
                key = hash_key(service.hash_key, head, self._target, conn.client.ip)
            endpoint = service.balancer.pick(candidates, key)
        if endpoint is None:
            if service.demand is not None and last_error is None and not self._tried:
                self._hold_for_instance(service)
                return
            self._fail(last_error or NoHealthyEndpoint(f"no available endpoint in {service.name}"))
            return
        self.endpoint = endpoint
        endpoint.in_flight += 1
        endpoint.requests += 1
        self.head_bytes = forwarding.request_head(
            head,
            self._target,
            self._host,
            conn.client,
            conn.ctx.snapshot.forwarding,
            service.host_override,
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
        service.waiters.append(self._instance_ready)
        self._arm(U_COLD, service.cold_start_timeout)
        service.demand()  # type: ignore[misc]

    def _instance_ready(self) -> None:
        if self.done:
            return
        self._disarm()
        self._dispatch(NoHealthyEndpoint("no instance became ready"))

    async def _connect(self) -> None:
        pool = self.pool
        assert pool is not None and self.service is not None
        try:
            upstream = await pool.connect(self.service.connect_timeout)
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
        service = self.service
        assert service is not None
        if service.measures_latency or service.latencies is not None:
            self._sent_at = self.conn.ctx.loop.time()
        self._arm(U_HEADER, self._header_timeout())

    def _header_timeout(self) -> float:
        service = self.service
        assert service is not None
        return service.retry.per_try_timeout or service.response_header_timeout

    # --- request body (from the client connection) -------------------------------------------

    def on_request_data(self, data: bytes) -> None:
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
                self.sent_bytes += len(data)
                conn.write(chunk(data) if self._client_chunked else data)
                if self._timer_kind == U_BODY:
                    conn.up_timer.set(self.service.body_idle_timeout)  # type: ignore[union-attr]
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
                self.status = 101
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
        if service.measures_latency:
            now = loop.time()
            record_latency(endpoint, now - self._sent_at, now)
        if service.latencies is not None:
            service.latencies.append(loop.time() - self._sent_at)
        if status >= 500:
            outliers.report(service, endpoint, False, f"status {status}", loop)
            if status in service.retry.retry_on and self._may_retry(status, True):
                self._retry(None)
                return
        elif service.outlier is not None:
            outliers.report(service, endpoint, True, "", loop)
        self.status = status
        self.response_started = True
        framing = resp.framing
        client_11 = head.version == b"1.1"
        chunked = client_11 and framing in ("chunked", "close")
        keep = self._keep_alive and not (framing in ("chunked", "close") and not client_11)
        if conn.ctx.closing or not self.request_done:
            # Answered before the request body ended (e.g. an early 413): rather than read and
            # discard an unknown amount of body, close after this response.
            keep = False
        self._keep_alive = keep
        self._client_chunked = chunked
        extra = b""
        if self._set_cookie and service.sticky is not None:
            value = service.sticky.value_for(endpoint)
            extra = set_cookie_line(service.sticky_cookie, value, service.sticky_max_age)
        self._write_head(resp, chunked=chunked, keep_alive=keep, extra=extra)
        upstream = self.upstream
        if upstream is not None and (not resp.keep_alive or framing == "close"):
            upstream.reusable = False
        if framing != "none":
            self._arm(U_BODY, self.service.body_idle_timeout)  # type: ignore[union-attr]
        else:
            self._disarm()

    def _write_head(
        self,
        resp: ResponseHead,
        *,
        chunked: bool = False,
        keep_alive: bool = True,
        extra: bytes = b"",
    ) -> None:
        conn = self.conn
        conn.write(
            forwarding.response_head(
                resp,
                chunked=chunked,
                keep_alive=keep_alive,
                client_version=self.head.version,
                via=conn.ctx.snapshot.forwarding.via,
                extra=extra,
            )
        )

    def _complete(self) -> None:
        if self._client_chunked:
            self.conn.write(LAST_CHUNK)
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            if not self.request_done:
                upstream.reusable = False  # the upstream answered before reading the body
            upstream.release()
        self._finish(self._keep_alive)

    # --- upgrade tunnel ---------------------------------------------------------------------

    def on_upgraded(self, leftover: bytes) -> None:
        conn = self.conn
        conn.tunnel = True
        self._arm(U_BODY, self.service.body_idle_timeout)  # type: ignore[union-attr]
        if leftover:
            conn.write(leftover)
        client_leftover = conn.parser.upgrade_leftover
        conn.parser.upgrade_leftover = b""
        if client_leftover and self.upstream is not None:
            self.upstream.write(client_leftover)

    def on_tunnel_data(self, data: bytes) -> None:
        self.conn.write(data)
        self.conn.up_timer.set(self.service.body_idle_timeout)  # type: ignore[union-attr]

    def on_tunnel_closed(self) -> None:
        # A tunnel has no framing: the upstream closing is its normal end. Close the client
        # gracefully so the bytes already queued for it are still delivered.
        self.upstream = None
        self._finish(False)

    def tunnel_from_client(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
            self.conn.up_timer.set(self.service.body_idle_timeout)  # type: ignore[union-attr]

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
                self.conn.up_timer.set(self.service.body_idle_timeout)  # type: ignore[union-attr]

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

    def _can_retry_fresh(self, error: PorticoError) -> bool:
        """A warm connection that died before a single response byte: the keep-alive race.

        Only bodiless idempotent requests are replayed: their whole request is ``head_bytes``,
        and the close cannot be told apart from a backend that read the request and died on
        it, so a POST could run twice. General retries belong to ``policy.retry``.
        """
        upstream = self.upstream
        return (
            self._reused
            and not self._retried
            and isinstance(error, UpstreamError)
            and not isinstance(error, ResponseTimeout)
            and upstream is not None
            and upstream.bytes_in == 0
            and self.head.framing == "none"
            and is_idempotent(self.head.method)
        )

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
        self.status = error.status
        keep = (
            self._keep_alive
            and not self.conn.ctx.closing
            and (self.request_done or self.head.framing == "none")
        )
        response = response_for(error, close=not keep)
        # The access log counts body bytes sent, Portico's own error bodies included.
        self.sent_bytes = len(response) - response.index(b"\r\n\r\n") - 4
        self.conn.write(response)
        self._finish(keep)

    def _may_retry(self, outcome: Failure | int, request_sent: bool) -> bool:
        service = self.service
        assert service is not None
        if not service.retry.should_retry(
            self.head.method,
            self._attempt,
            outcome,
            request_sent=request_sent,
            request_body_sent=self._body_sent,
            response_started=self.response_started,
        ):
            return False
        if self._holds_retry:
            return True  # this request already counts against the budget
        return service.budget.can_retry(service.active_requests(), service.active_retries)

    def _retry(self, error: PorticoError | None) -> None:
        """Give up on the current endpoint and send the request to another one."""
        service = self.service
        endpoint = self.endpoint
        assert service is not None and endpoint is not None
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.abort()  # a discarded response must not be read by the next user
        self._disarm()
        endpoint.in_flight -= 1
        self._tried.append(endpoint)
        self.endpoint = None
        self.pool = None
        self._attempt += 1
        self._retried = False
        if not self._holds_retry:
            self._holds_retry = True
            service.active_retries += 1
        self._dispatch(error or UpstreamError("every endpoint tried answered with an error"))

    def _release_retry(self) -> None:
        if self._holds_retry:
            self._holds_retry = False
            assert self.service is not None
            self.service.active_retries -= 1

    def _finish(self, keep_alive: bool, abort: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self._disarm()
        self._release_retry()
        ep = self.endpoint
        if ep is not None:
            ep.in_flight -= 1
        log = self.conn.ctx.access_log
        if log is not None:
            log.log_request(
                self.conn.client.ip,
                self.head,
                self.status,
                self.sent_bytes,
                self.conn.ctx.loop.time() - self._started_at,
                self.endpoint.label if self.endpoint else None,
            )
        if abort:
            conn = self.conn
            conn.exchange = None
            conn.abort()
            return
        self.conn.exchange_finished(keep_alive)

    def client_gone(self) -> None:
        """The client connection closed or was closed under us."""
        if self.done:
            return
        self.done = True
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
        log = self.conn.ctx.access_log
        if log is not None:
            if not self.status:
                self.status = 499  # nginx's "client closed request"
            log.log_request(
                self.conn.client.ip,
                self.head,
                self.status,
                self.sent_bytes,
                self.conn.ctx.loop.time() - self._started_at,
                self.endpoint.label if self.endpoint else None,
            )
