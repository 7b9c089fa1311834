"""A sticky cookie names a backend; it is obeyed only while that backend may take requests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from portico.policy.balancers import select_candidates
from portico.policy.hashing import StickyCookie
from portico.runtime.endpoint import Endpoint

SECRET = b"0123456789abcdef-test-secret"


def make_down(ep: Endpoint) -> None:
    ep.up = False


def make_ejected(ep: Endpoint) -> None:
    ep.ejected = True


def make_draining(ep: Endpoint) -> None:
    ep.draining = True


@pytest.mark.parametrize("unavailable", [make_down, make_ejected, make_draining])
def test_a_cookie_for_an_unavailable_backend_is_not_obeyed(
    unavailable: Callable[[Endpoint], None],
) -> None:
    endpoints = [Endpoint("127.0.0.1", 5000 + i) for i in range(3)]
    sticky = StickyCookie(SECRET, scope="app")
    value = sticky.value_for(endpoints[1])
    assert sticky.pick(value, select_candidates(endpoints, 0.0)) is endpoints[1]
    unavailable(endpoints[1])
    assert sticky.pick(value, select_candidates(endpoints, 0.0)) is None
    assert endpoints[1] not in select_candidates(endpoints, 0.0)


def test_a_cookie_for_a_backend_already_tried_is_not_obeyed() -> None:
    endpoints = [Endpoint("127.0.0.1", 5000 + i) for i in range(3)]
    sticky = StickyCookie(SECRET, scope="app")
    value = sticky.value_for(endpoints[0])
    assert sticky.pick(value, select_candidates(endpoints, 0.0, exclude=[endpoints[0]])) is None
