"""Retry decisions and the retry budget: a table of cases, no sockets."""

from __future__ import annotations

import pytest

from portico.errors import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    ResponseTimeout,
    UpstreamClosed,
    UpstreamError,
)
from portico.policy.retry import (
    DEFAULT_RETRY_ON,
    Failure,
    RetryBudget,
    RetryPolicy,
    classify,
    is_idempotent,
)

POLICY = RetryPolicy()  # 3 attempts, 502/503/504, retry connect failures, resets, timeouts

CF, CT, RESET, TIMEOUT, BAD = (
    Failure.CONNECT_FAILED,
    Failure.CONNECT_TIMEOUT,
    Failure.RESET,
    Failure.TIMEOUT,
    Failure.BAD_RESPONSE,
)

# (method, attempt, outcome, request_sent, body_sent, response_started, expected, why)
CASES = [
    ("GET", 1, CF, False, False, False, True, "connect failed: nothing sent"),
    ("POST", 1, CF, False, False, False, True, "connect failed: a POST is safe too"),
    ("POST", 1, CT, True, False, False, True, "connect timeout sends nothing, whatever the flag"),
    ("PATCH", 2, CF, False, False, False, True, "second try of three"),
    ("GET", 3, CF, False, False, False, False, "attempts used up"),
    ("GET", 1, RESET, True, False, False, True, "reset before response: idempotent"),
    ("PUT", 1, RESET, True, False, False, True, "PUT is idempotent"),
    ("DELETE", 1, RESET, True, False, False, True, "DELETE is idempotent"),
    ("HEAD", 1, RESET, True, False, False, True, "HEAD is safe"),
    ("OPTIONS", 1, RESET, True, False, False, True, "OPTIONS is safe"),
    ("POST", 1, RESET, True, False, False, False, "POST may have reached the backend"),
    ("PATCH", 1, RESET, True, False, False, False, "PATCH is not idempotent"),
    ("POST", 1, RESET, False, False, False, True, "pooled conn dead before a byte was written"),
    ("GET", 1, 502, True, False, False, True, "502 in retry_on"),
    ("GET", 1, 503, True, False, False, True, "503 in retry_on"),
    ("GET", 1, 504, True, False, False, True, "504 in retry_on"),
    ("GET", 1, 500, True, False, False, False, "500 is the app's own error"),
    ("GET", 1, 404, True, False, False, False, "a 404 is an answer"),
    ("GET", 1, 200, True, False, False, False, "success"),
    ("POST", 1, 503, True, False, False, False, "a POST that got a 503 reached a backend"),
    ("GET", 1, TIMEOUT, True, False, False, True, "per-try timeout, idempotent"),
    ("POST", 1, TIMEOUT, True, False, False, False, "per-try timeout, POST may be running"),
    ("GET", 1, BAD, True, False, False, True, "garbage answer counts as a 502"),
    ("PUT", 1, RESET, True, True, False, False, "PUT body already streamed: nothing to replay"),
    ("GET", 1, 503, True, False, True, False, "response started to the client"),
    ("GET", 1, CF, False, False, True, False, "response started (cannot happen, still no)"),
    (b"GET", 1, 503, True, False, False, True, "methods as the codec's bytes"),
    ("get", 1, RESET, True, False, False, False, "methods are case-sensitive (RFC 9110 9.1)"),
]


@pytest.mark.parametrize(
    ("method", "attempt", "outcome", "sent", "body_sent", "started", "expected"),
    [c[:7] for c in CASES],
    ids=[c[7] for c in CASES],
)
def test_retry_decision_table(
    method: str | bytes,
    attempt: int,
    outcome: Failure | int,
    sent: bool,
    body_sent: bool,
    started: bool,
    expected: bool,
) -> None:
    got = POLICY.should_retry(
        method,
        attempt,
        outcome,
        request_sent=sent,
        request_body_sent=body_sent,
        response_started=started,
    )
    assert got is expected


def test_defaults_assume_the_request_reached_the_backend() -> None:
    assert POLICY.should_retry("GET", 1, 503)
    assert not POLICY.should_retry("POST", 1, Failure.RESET)


def test_switches_turn_off_each_failure_kind() -> None:
    off = RetryPolicy(on_connect_failure=False, on_reset=False, on_timeout=False)
    for failure in (CF, CT, RESET, TIMEOUT):
        assert not off.should_retry("GET", 1, failure, request_sent=False)
    assert off.should_retry("GET", 1, 503)


def test_retry_on_is_configurable() -> None:
    p = RetryPolicy(retry_on=frozenset({429}))
    assert p.should_retry("GET", 1, 429)
    assert not p.should_retry("GET", 1, 503)
    assert not p.should_retry("GET", 1, BAD)  # bad responses follow 502
    assert frozenset({502, 503, 504}) == DEFAULT_RETRY_ON


def test_single_attempt_never_retries() -> None:
    p = RetryPolicy(attempts=1)
    assert not p.should_retry("GET", 1, CF, request_sent=False)


def test_policy_validates() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(per_try_timeout=0.0)
    assert RetryPolicy(per_try_timeout=2.5).per_try_timeout == 2.5


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (ConnectFailed("refused"), CF),
        (ConnectTimeout(), CT),
        (UpstreamClosed("closed"), RESET),
        (ResponseTimeout("slow"), TIMEOUT),
        (BadResponse("garbage"), BAD),
        (UpstreamError("other"), RESET),
    ],
)
def test_classify_upstream_errors(error: UpstreamError, failure: Failure) -> None:
    assert classify(error) is failure


def test_idempotent_methods() -> None:
    for m in ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE", b"GET"):
        assert is_idempotent(m)
    for m in ("POST", "PATCH", "CONNECT", b"POST", "gét"):
        assert not is_idempotent(m)


# --- retry budget ----------------------------------------------------------------------------


def test_budget_floor_allows_retries_when_quiet() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrent=3)
    assert budget.can_retry(active_requests=1, active_retries=0)
    assert budget.can_retry(active_requests=2, active_retries=2)
    assert not budget.can_retry(active_requests=3, active_retries=3)


def test_budget_is_a_share_of_active_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_concurrent=3)
    assert budget.limit(100) == 20
    assert budget.can_retry(100, 19)
    assert not budget.can_retry(100, 20)
    assert budget.limit(1000) == 200


def test_budget_stops_a_retry_storm() -> None:
    """Every request fails; each wants retries. Retries in flight stay at the budget."""
    budget = RetryBudget(ratio=0.25, min_concurrent=2)
    policy = RetryPolicy(attempts=5)
    active, retries = 400, 0
    for _ in range(10_000):
        if policy.should_retry("GET", 1, 503) and budget.can_retry(active + retries, retries):
            retries += 1
    assert retries == budget.limit(active + retries) == 133  # 533 * 0.25


def test_zero_budget_with_no_floor_forbids_retries() -> None:
    assert not RetryBudget(ratio=0.0, min_concurrent=0).can_retry(100, 0)


def test_budget_validates() -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio=1.5)
    with pytest.raises(ValueError):
        RetryBudget(min_concurrent=-1)
