"""Router.match shortcuts: host lookups skipped when no route names a host, the any-host index
skipped when every route does, and bare routes returned without checking conditions. Each
shortcut must give the same route as the full rules (pure: compiled configs, parsed heads)."""

from __future__ import annotations

import pytest

from portico.codec.events import RequestHead
from portico.codec.parser import RequestParser
from portico.config.load import load_text
from portico.runtime.request import RequestState
from portico.runtime.routes import Router, _hostname
from portico.runtime.snapshot import compile_config

UPSTREAM = '[upstreams.app]\nbackends = ["http://127.0.0.1:5001"]\n\n'


def router(routes: str) -> Router:
    return compile_config(load_text(UPSTREAM + routes)).router


def request(target: str, host: str | None, method: str = "GET", extra: str = "") -> RequestState:
    version = "1.1" if host is not None else "1.0"
    host_line = f"Host: {host}\r\n" if host is not None else ""
    raw = f"{method} {target} HTTP/{version}\r\n{host_line}{extra}\r\n".encode()
    head = RequestParser().feed(raw)[0]
    assert isinstance(head, RequestHead)
    return RequestState(head, head.target, head.host, "127.0.0.1", False, b"http", 0.0, None)


def matched(r: Router, req: RequestState) -> str | None:
    route = r.match(req)
    return None if route is None else route.name


def host_routes(count: int) -> str:
    return "".join(
        f'[[routes]]\nname = "h{i}"\nhost = "h{i}.example.test"\nupstream = "app"\n\n'
        for i in range(count)
    )


@pytest.mark.parametrize(
    "host",
    [b"a.example", b"A.Example:8080", b"[::1]:8080", b"[::1]", b"[FE80::1]", b"x.example:", b"h"],
)
def test_hostname_agrees_with_the_request_state(host: bytes) -> None:
    req = request("/", host.decode())
    assert _hostname(host) == req.hostname.lower()


def test_host_table_ignores_case_and_port() -> None:
    r = router(host_routes(50))
    assert matched(r, request("/x", "H25.Example.TEST:8080")) == "h25"
    assert matched(r, request("/x", "h49.example.test")) == "h49"


def test_host_table_without_catch_all_answers_nothing_for_other_hosts() -> None:
    r = router(host_routes(10))
    assert matched(r, request("/x", "h10.example.test")) is None
    assert matched(r, request("/x", "[::1]:8080")) is None
    assert matched(r, request("/x", None)) is None


def test_path_table_matches_whatever_the_host() -> None:
    paths = "".join(
        f'[[routes]]\nname = "p{i}"\npath = "/svc{i}/"\nupstream = "app"\n\n' for i in range(100)
    )
    r = router(paths)
    assert matched(r, request("/svc50/small", "anything.example:99")) == "p50"
    assert matched(r, request("/svc5/small", None)) == "p5"
    assert matched(r, request("/svc500/small", "anything.example")) is None


def test_host_routes_and_any_host_routes_together() -> None:
    r = router(
        host_routes(3)
        + '[[routes]]\nname = "wild"\nhost = "*.example.test"\nupstream = "app"\n\n'
        + '[[routes]]\nname = "any"\npath = "/"\nupstream = "app"\n\n'
    )
    assert matched(r, request("/", "h1.example.test")) == "h1"
    assert matched(r, request("/", "other.example.test:80")) == "wild"
    assert matched(r, request("/", "elsewhere.example")) == "any"
    assert matched(r, request("/", None)) == "any"


def test_a_route_with_conditions_is_checked_and_falls_through() -> None:
    r = router(
        '[[routes]]\nname = "get-only"\npath = "/x/"\nmethods = ["GET"]\nupstream = "app"\n\n'
        '[[routes]]\nname = "canary"\npath = "/x/"\nheaders = { "X-Canary" = "1" }\n'
        'upstream = "app"\n\n'
        '[[routes]]\nname = "regex"\npath_regex = "^/r/(?P<id>[0-9]+)$"\nupstream = "app"\n\n'
        '[[routes]]\nname = "rest"\npath = "/"\nupstream = "app"\n\n'
    )
    assert matched(r, request("/x/a", "h")) == "get-only"
    assert matched(r, request("/x/a", "h", method="POST")) == "rest"
    assert matched(r, request("/x/a", "h", method="POST", extra="X-Canary: 1\r\n")) == "canary"
    req = request("/r/42", "h")
    assert matched(r, req) == "regex"
    assert req.captures == {"id": "42", "1": "42"}
    assert matched(r, request("/r/x", "h")) == "rest"
    bare = {route.name: route.bare for route in r.routes}
    assert bare == {"get-only": False, "canary": False, "regex": False, "rest": True}
