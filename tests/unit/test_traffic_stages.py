"""Traffic stages on request values: keys, IP rules, replies. No sockets, no clock."""

from __future__ import annotations

import mmap

from portico.codec.events import RequestHead
from portico.config.load import load_text
from portico.runtime.limittable import LimitTable, table_bytes
from portico.runtime.request import RequestState
from portico.runtime.snapshot import compile_config
from portico.runtime.stages import Hold, LocalReply
from portico.runtime.traffic import IpRules, TrafficStores, compile_key


def state(
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    peer: str = "192.0.2.7",
    target: bytes = b"/a?b=1",
    now: float = 100.0,
) -> RequestState:
    head = RequestHead(
        b"GET",
        target,
        b"1.1",
        [(b"Host", b"example.com:8080"), *headers],
        host=b"example.com:8080",
        keep_alive=True,
        framing="none",
        content_length=None,
        connection_tokens=frozenset(),
        expect_continue=False,
        upgrade=False,
    )
    return RequestState(head, target, b"example.com:8080", peer, False, b"http", now)


def test_keys() -> None:
    req = state([(b"X-Api-Key", b"k1"), (b"Cookie", b"a=1; session=s9; b=2")])
    assert compile_key("client_ip")(req) == b"192.0.2.7"
    assert compile_key("header:x-api-key")(req) == b"k1"
    assert compile_key("cookie:session")(req) == b"s9"
    assert compile_key("path")(req) == b"/a"
    assert compile_key("host")(req) == b"example.com"
    assert compile_key(["client_ip", "header:X-Api-Key"])(req) == b"192.0.2.7\0k1"
    # A missing part means no key: the limit does not apply.
    assert compile_key("cookie:other")(req) is None
    assert compile_key(["client_ip", "header:X-Missing"])(req) is None


def test_ip_rules_deny_wins_and_layers_stack() -> None:
    import ipaddress

    nets = lambda *n: tuple(ipaddress.ip_network(x) for x in n)  # noqa: E731
    top = (None, nets("203.0.113.0/24"))  # top level: deny one network
    route = (nets("192.0.2.0/24"), nets("192.0.2.66/32"))  # route: allow one, deny a host
    stage = IpRules([top, route])
    assert stage.on_request(state(peer="192.0.2.7")) is None
    assert isinstance(stage.on_request(state(peer="192.0.2.66")), LocalReply)
    assert isinstance(stage.on_request(state(peer="198.51.100.1")), LocalReply)  # not allowed
    assert isinstance(stage.on_request(state(peer="203.0.113.5")), LocalReply)  # top denies
    assert isinstance(stage.on_request(state(peer="unix")), LocalReply)  # in no network


def chain(config: str) -> list[object]:
    c = load_text(
        '[upstreams.app]\nbackends = ["http://127.0.0.1:5001"]\n' + config
    )
    stores = TrafficStores(c.traffic, rates=LimitTable(memoryview(mmap.mmap(-1, table_bytes(64)))))
    snap = compile_config(c, traffic=stores)
    return list(snap.router.routes[0].request_stages)


def test_limits_answer_with_their_status_and_headers() -> None:
    (stage,) = chain('[[routes]]\nupstream = "app"\nrate_limit = { rate = 2, burst = 1 }\n')
    first = state(now=10.0)
    assert stage.on_request(first) is None  # type: ignore[attr-defined]
    assert first.limit_headers == [
        (b"RateLimit-Policy", b'"routes[0].0";q=2;w=1'),
        (b"RateLimit", b'"routes[0].0";r=0;t=1'),
    ]
    refused = stage.on_request(state(now=10.1))  # type: ignore[attr-defined]
    assert isinstance(refused, LocalReply) and refused.status == 429
    assert (b"Retry-After", b"1") in refused.headers
    assert stage.on_request(state(now=10.5)) is None  # type: ignore[attr-defined]


def test_a_refusal_by_a_later_limit_charges_nothing_earlier() -> None:
    (stage,) = chain(
        '[[routes]]\nupstream = "app"\n'
        'rate_limit = [{ rate = 100, burst = 2 }, { key = "path", rate = 1, per = "hour" }]\n'
    )
    assert stage.on_request(state(now=1.0)) is None  # type: ignore[attr-defined]
    # The second limit (per path) refuses; the first gives its token back, so after two more
    # refusals the client still has its whole burst of 2 for another path.
    for _ in range(2):
        assert isinstance(stage.on_request(state(now=1.0)), LocalReply)  # type: ignore[attr-defined]
    assert stage.on_request(state(now=1.0, target=b"/x")) is None  # type: ignore[attr-defined]


def test_delay_is_a_hold() -> None:
    (stage,) = chain(
        '[[routes]]\nupstream = "app"\nrate_limit = { rate = 10, burst = 1, delay = 0.5 }\n'
    )
    assert stage.on_request(state(now=5.0)) is None  # type: ignore[attr-defined]
    held = stage.on_request(state(now=5.0))  # type: ignore[attr-defined]
    assert isinstance(held, Hold) and abs(held.delay - 0.1) < 1e-9
