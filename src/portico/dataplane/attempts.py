"""Tries of a proxy exchange: when a failed try may be replayed, and moving to another endpoint.

Two kinds of replay, kept apart on purpose:
* the keep-alive race (``can_retry_fresh``): a pooled connection that died before a single
  response byte. Only bodiless idempotent requests are replayed, on a fresh connection to
  the same endpoint: the close cannot be told apart from a backend that read the request
  and died on it, so a POST could run twice.
* a retry (``may_retry`` / ``retry``): ``policy.retry`` decides from the method, the
  outcome, what was sent, the attempts left and the budget; the request deadline bounds
  every retry; the request goes to an endpoint not tried yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from portico.errors import PorticoError, ResponseTimeout, UpstreamError
from portico.policy.retry import Failure, is_idempotent

if TYPE_CHECKING:
    from portico.codec.events import RequestHead
    from portico.dataplane.exchange import ClientSide
    from portico.dataplane.upstream import UpstreamConnection
    from portico.policy.retry import RetryPolicy
    from portico.runtime.endpoint import Endpoint
    from portico.runtime.routes import RouteTarget
    from portico.runtime.snapshot import Service


class AttemptsMixin:
    # Empty slots keep the exchange free of a __dict__; hidden from mypy, which would
    # otherwise refuse assignments to the attributes the exchange's own slots declare.
    if not TYPE_CHECKING:
        __slots__ = ()
    conn: ClientSide
    head: RequestHead
    upstream: UpstreamConnection | None
    endpoint: Endpoint | None
    service: Service | None
    target: RouteTarget | None
    pool: object
    response_started: bool
    _reused: bool
    _retried: bool
    _attempt: int
    _tried: list[Endpoint]
    _body_sent: bool
    _holds_retry: bool
    _deadline_at: float

    def _disarm(self) -> None: ...
    def _dispatch(self, last_error: PorticoError | None) -> None: ...

    def _can_retry_fresh(self, error: PorticoError) -> bool:
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

    def _may_retry(self, outcome: Failure | int, request_sent: bool) -> bool:
        service = self.service
        target = self.target
        assert service is not None and target is not None
        if self.conn.ctx.loop.time() >= self._deadline_at:
            return False  # the request deadline has passed: no try may start
        retry: RetryPolicy = target.retry  # type: ignore[assignment]
        if not retry.should_retry(
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
