"""Retries: whether a failed try may be replayed on another endpoint, and how many may run.

Theory of operation. After a try fails, the proxy asks ``RetryPolicy.should_retry`` with what
it knows: the method, which try this was, what went wrong (a ``Failure`` or the response
status), whether any byte of the request may have reached the backend, whether body bytes
have been streamed away (and so cannot be sent again), and whether the response has started
towards the client. Then it asks ``RetryBudget.can_retry`` whether the upstream can afford
another retry right now. Only if both say yes does it pick again, excluding the endpoints
already tried (``policy.balancers.select_candidates(..., exclude=tried)``); if nothing is
left it answers with the last error.

The safety rule, in one line: a request is replayed only if the backend cannot have acted
on it (nothing was sent: connect failed or timed out) or acting twice is harmless (an
idempotent method, RFC 9110 section 9.2.2). A POST that may have reached a dying backend is
never replayed, whatever the failure: the client gets the error and decides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from portico.errors import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    ResponseTimeout,
    UpstreamError,
)

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
"""RFC 9110 9.2.2: the safe methods plus PUT and DELETE. Repeating one of these has the same
effect on the server as sending it once, so a lost answer may be asked for again."""

DEFAULT_RETRY_ON = frozenset({502, 503, 504})
"""Statuses meaning "this backend could not serve it", where another backend may succeed. A
500 is left out: it is usually the application's own bug and would fail everywhere."""


class Failure(enum.Enum):
    """How a try failed without a usable response status."""

    CONNECT_FAILED = "connect_failed"  # refused, unreachable, reset while connecting
    CONNECT_TIMEOUT = "connect_timeout"  # the TCP handshake did not finish in time
    RESET = "reset"  # the backend closed or reset before the first response byte
    TIMEOUT = "timeout"  # the per-try timeout ran out before the response head
    BAD_RESPONSE = "bad_response"  # the backend answered with something that is not HTTP


_NOTHING_SENT = frozenset({Failure.CONNECT_FAILED, Failure.CONNECT_TIMEOUT})


def classify(error: UpstreamError) -> Failure:
    """The ``Failure`` for an upstream error raised by the data plane."""
    if isinstance(error, ConnectTimeout):
        return Failure.CONNECT_TIMEOUT
    if isinstance(error, ConnectFailed):
        return Failure.CONNECT_FAILED
    if isinstance(error, ResponseTimeout):
        return Failure.TIMEOUT
    if isinstance(error, BadResponse):
        return Failure.BAD_RESPONSE
    return Failure.RESET  # UpstreamClosed and any other loss before a response head


def is_idempotent(method: bytes | str) -> bool:
    if isinstance(method, str):
        method = method.encode("ascii", "replace")
    return method in IDEMPOTENT_METHODS


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to retry. ``attempts`` counts every try, the first included (1 = never retry)."""

    attempts: int = 3
    retry_on: frozenset[int] = field(default=DEFAULT_RETRY_ON)
    per_try_timeout: float | None = None  # seconds to a response head, per try; None = off
    on_connect_failure: bool = True  # Failure.CONNECT_FAILED / CONNECT_TIMEOUT
    on_reset: bool = True  # Failure.RESET: closed or reset before any response byte
    on_timeout: bool = True  # Failure.TIMEOUT: the per-try timeout ran out

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.per_try_timeout is not None and self.per_try_timeout <= 0:
            raise ValueError("per_try_timeout must be > 0")

    def _outcome_allowed(self, outcome: Failure | int) -> bool:
        if isinstance(outcome, Failure):
            if outcome in _NOTHING_SENT:
                return self.on_connect_failure
            if outcome is Failure.RESET:
                return self.on_reset
            if outcome is Failure.TIMEOUT:
                return self.on_timeout
            return 502 in self.retry_on  # BAD_RESPONSE is answered 502
        return outcome in self.retry_on

    def should_retry(
        self,
        method: bytes | str,
        attempt: int,
        outcome: Failure | int,
        *,
        request_sent: bool = True,
        request_body_sent: bool = False,
        response_started: bool = False,
    ) -> bool:
        """Whether the try numbered ``attempt`` (1 = the first), which ended in ``outcome``,
        may be replayed on another endpoint.

        ``request_sent``: any byte of the request may have reached the backend (the
        ``UpstreamError.request_sent`` flag; always True once a status came back; ignored
        for connect failures, which send nothing). ``request_body_sent``: body bytes were
        streamed upstream and are no longer held, so there is nothing to replay (pass False
        for bodiless requests and when the body was buffered whole). ``response_started``:
        response bytes have gone to the client, which cannot be taken back.
        """
        if response_started or request_body_sent or attempt >= self.attempts:
            return False
        if not self._outcome_allowed(outcome):
            return False
        if outcome in _NOTHING_SENT or not request_sent:
            return True  # the backend saw nothing: safe for every method
        return is_idempotent(method)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Caps retries to a share of active requests, as Envoy's retry budget does.

    Per-request attempt limits do not stop a retry storm: when every backend is sick, each
    request still makes ``attempts`` tries, multiplying load on a fleet that is already
    failing. The budget lets at most ``ratio`` of the active requests be retries, with a
    floor of ``min_concurrent`` so that a quiet upstream can still retry at all.
    """

    ratio: float = 0.2
    min_concurrent: int = 3

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0 or self.min_concurrent < 0:
            raise ValueError("ratio must be in [0, 1] and min_concurrent >= 0")

    def limit(self, active_requests: int) -> int:
        """Most retries that may be in progress at once with this many active requests."""
        return max(self.min_concurrent, int(active_requests * self.ratio))

    def can_retry(self, active_requests: int, active_retries: int) -> bool:
        """Whether one more retry fits. Counts are per upstream, retries included in both."""
        return active_retries < self.limit(active_requests)
