"""Forwarding, over real sockets: balancing, routing, header rewriting, targets, framing,
HTTP/1.0, interim responses, pipelining, upstream keep-alive and the access log.

Backends are the Flask example under gunicorn (three instances a, b, c) where balancing and
a real application matter, and ``RawBackend`` servers where the exact bytes matter:
``echo_http`` reports exactly what was forwarded, scripted ones send fixed responses. Proxies
and backends that several tests can share are module-scoped.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import OK_RESPONSE, GunicornFlask, RawBackend, echo_http, respond
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection, RawResponse, build_request, chunked, send_raw
from tests.support.waiting import wait_until

# The one address the module's "trusted proxy" clients connect from; everything else on
# loopback (127.0.0.1) is an untrusted client. Linux routes all of 127.0.0.0/8 to lo.
TRUSTED_SOURCE = "127.0.0.2"


def flask_upstream(backends: list[GunicornFlask], balancer: str) -> dict[str, Any]:
    return {
        "server": {"shutdown_grace": 1},
        "upstreams": {"app": {"balancer": balancer, "backends": [b.url for b in backends]}},
    }


@pytest.fixture(scope="module")
def rr_proxy(flask_backends: list[GunicornFlask]) -> Iterator[PorticoProcess]:
    with PorticoProcess(flask_upstream(flask_backends, "round_robin")) as proc:
        yield proc


@pytest.fixture(scope="module")
def lc_proxy(flask_backends: list[GunicornFlask]) -> Iterator[PorticoProcess]:
    with PorticoProcess(flask_upstream(flask_backends, "least_connections")) as proc:
        yield proc


@pytest.fixture(scope="module")
def echo_backend() -> Iterator[RawBackend]:
    with RawBackend(echo_http()) as backend:
        yield backend


@pytest.fixture(scope="module")
def echo_proxy(echo_backend: RawBackend) -> Iterator[PorticoProcess]:
    """Defaults (X-Forwarded-* on, Forwarded and Via off); clients from TRUSTED_SOURCE are a
    trusted proxy; ``/renamed/`` goes to an upstream that sets its own Host."""
    config = {
        "server": {"shutdown_grace": 1},
        "forwarding": {"trusted_proxies": [TRUSTED_SOURCE]},
        "upstreams": {
            "echo": {"backends": [echo_backend.url]},
            "renamed": {"backends": [echo_backend.url], "host": "backend.internal"},
        },
        "routes": [
            {"path": "/renamed/", "upstream": "renamed"},
            {"path": "/", "upstream": "echo"},
        ],
    }
    with PorticoProcess(config) as proc:
        yield proc


@pytest.fixture(scope="module")
def annotating_proxy(echo_backend: RawBackend) -> Iterator[PorticoProcess]:
    """RFC 7239 Forwarded and Via on, named ``edge``."""
    config = {
        "server": {"shutdown_grace": 1},
        "forwarding": {
            "forwarded": True,
            "via": True,
            "via_name": "edge",
            "trusted_proxies": [TRUSTED_SOURCE],
        },
        "upstreams": {"echo": {"backends": [echo_backend.url]}},
    }
    with PorticoProcess(config) as proc:
        yield proc


# Fixed upstream responses, one backend each, routed by path prefix.
CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
    b"Trailer: X-Sum\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n"
)
CLOSE_BODY = b"".join(b"close-delimited line %05d\n" % i for i in range(2000))
SCRIPTS: dict[str, tuple[bytes, bool]] = {
    "/chunked": (CHUNKED_RESPONSE, True),
    "/close": (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + CLOSE_BODY, False),
    "/length": (OK_RESPONSE, True),
    "/hints": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + OK_RESPONSE,
        True,
    ),
    "/hop": (
        b"HTTP/1.1 200 OK\r\nConnection: X-Resp-Hop, close-not\r\nX-Resp-Hop: 1\r\n"
        b"Close-Not: 2\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n"
        b"Proxy-Connection: keep-alive\r\nTrailer: X-T\r\nUpgrade: h2c\r\nTE: trailers\r\n"
        b"X-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
        True,
    ),
    "/cl-token": (
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
        True,
    ),
}


@pytest.fixture(scope="module")
def scripted_proxy() -> Iterator[PorticoProcess]:
    with contextlib.ExitStack() as stack:
        backends = {
            path: stack.enter_context(RawBackend(respond(raw, keep_alive=keep)))
            for path, (raw, keep) in SCRIPTS.items()
        }
        config = {
            "server": {"shutdown_grace": 1},
            "upstreams": {
                path.strip("/"): {"backends": [backend.url]} for path, backend in backends.items()
            },
            "routes": [{"path": path, "upstream": path.strip("/")} for path in SCRIPTS],
        }
        with PorticoProcess(config) as proc:
            yield proc


# --- helpers --------------------------------------------------------------------------------


def echo(proxy: PorticoProcess, target: str = "/", headers: Any = (), **kwargs: Any) -> Any:
    """One request on a fresh connection; what the echo backend saw, as JSON."""
    with RawConnection(proxy.port) as conn:
        response = conn.request("GET" if "body" not in kwargs else "POST", target, headers,
                                **kwargs)  # fmt: skip
    assert response.status == 200, response.raw
    return response.json()


def header_values(echoed: Any, name: str) -> list[str]:
    return [v for k, v in echoed["headers"] if k.lower() == name.lower()]


def request_from(
    source: str, port: int, method: str, target: str, headers: list[tuple[str, str]]
) -> Any:
    """A request from a chosen local address (http.client can bind one); echo JSON back."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        conn.close()


def pattern(n: int) -> bytes:
    """What the Flask app's /bytes/<n> sends."""
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


# --- balancing ------------------------------------------------------------------------------


def test_round_robin_answers_from_each_instance_in_turn(
    rr_proxy: PorticoProcess, flask_backends: list[GunicornFlask]
) -> None:
    with RawConnection(rr_proxy.port) as conn:
        seen = [conn.request("GET", "/whoami").json()["instance"] for _ in range(30)]
    assert Counter(seen) == {"a": 10, "b": 10, "c": 10}
    assert sorted(seen[:3]) == ["a", "b", "c"]
    assert seen == seen[:3] * 10, seen  # strictly in turn, not just evenly


def _established_to(proxy: PorticoProcess, ports: set[int]) -> list[int]:
    """Backend ports the proxy has an open connection to right now. The gunicorn sync
    workers close after every response, so an open one means a request in flight."""
    return sorted(
        c.raddr.port
        for c in psutil.Process(proxy.pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port in ports and c.status == psutil.CONN_ESTABLISHED
    )


def test_least_connections_steers_away_from_a_busy_instance(
    lc_proxy: PorticoProcess, flask_backends: list[GunicornFlask]
) -> None:
    ports = {b.port for b in flask_backends}
    with RawConnection(lc_proxy.port, timeout=10) as slow:
        slow.send(build_request("GET", "/sleep/1.5"))
        [busy] = wait_until(lambda: _established_to(lc_proxy, ports), timeout=5,
                            message="the slow request to reach a backend")  # fmt: skip
        with RawConnection(lc_proxy.port) as fast:
            answers = [fast.request("GET", "/whoami").json()["port"] for _ in range(8)]
        # Still in flight: the fast requests were all chosen while the instance was busy.
        assert busy in _established_to(lc_proxy, ports), "slow request ended too early"
        slept = slow.recv_response().json()
    assert slept["port"] == busy and slept["slept"] == 1.5
    assert busy not in answers, answers
    assert set(answers) == ports - {busy}  # ties between the idle two are spread


def test_round_robin_does_not_steer(
    rr_proxy: PorticoProcess, flask_backends: list[GunicornFlask]
) -> None:
    """Contrast: round robin sends the busy instance its turn regardless (the request
    waits for it); which is exactly what least_connections is for."""
    ports = {b.port for b in flask_backends}
    with RawConnection(rr_proxy.port, timeout=10) as slow:
        slow.send(build_request("GET", "/sleep/0.5"))
        [busy] = wait_until(lambda: _established_to(rr_proxy, ports), timeout=5)
        with RawConnection(rr_proxy.port, timeout=10) as fast:
            answers = [fast.request("GET", "/whoami").json()["port"] for _ in range(3)]
        assert slow.recv_response().json()["port"] == busy
    assert sorted(answers) == sorted(ports)


# --- routing --------------------------------------------------------------------------------


def test_routes_by_path_prefix_and_host(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    api = raw_backend(respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\napi"))
    web = raw_backend(respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nweb"))
    proxy = portico({
        "upstreams": {"api": {"backends": [api.url]}, "web": {"backends": [web.url]}},
        "routes": [
            {"path": "/api/", "upstream": "api"},
            {"host": "web.example", "upstream": "web"},
        ],
    })  # fmt: skip
    cases = [
        ("/api/users", "other.example", 200, b"api"),
        ("/api/", "other.example:8080", 200, b"api"),
        ("/", "web.example", 200, b"web"),
        ("/anything?x=1", "WEB.example:8443", 200, b"web"),  # host case and port ignored
        ("/api/users", "web.example", 200, b"web"),  # a Host route beats a path route
        ("/apix", "other.example", 404, b"404 Not Found\n"),  # a prefix, not a substring
        ("/api", "other.example", 404, b"404 Not Found\n"),
        ("/", "web.example.evil", 404, b"404 Not Found\n"),
    ]
    with RawConnection(proxy.port) as conn:
        for target, host, status, body in cases:
            response = conn.request("GET", target, host=host)
            assert (response.status, response.body) == (status, body), (target, host)
    # The 404s reached no backend; the connection stayed usable after them.
    assert api.all_received().count(b"GET ") == 2
    assert web.all_received().count(b"GET ") == 3


# --- header rewriting -----------------------------------------------------------------------


def test_hop_by_hop_request_headers_are_removed(echo_proxy: PorticoProcess) -> None:
    echoed = echo(echo_proxy, "/hop", [
        ("Host", "a.example"),
        ("Connection", "keep-alive, X-Hop-Token, x-other-hop"),
        ("Keep-Alive", "timeout=5"),
        ("X-Hop-Token", "secret"),
        ("X-Other-Hop", "secret too"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),  # not named in Connection: not an upgrade request
        ("X-End-To-End", "kept"),
    ])  # fmt: skip
    assert echoed["headers"] == [
        ["Host", "a.example"],
        ["X-End-To-End", "kept"],
        ["X-Forwarded-For", "127.0.0.1"],
        ["X-Forwarded-Proto", "http"],
        ["X-Forwarded-Host", "a.example"],
        ["X-Real-IP", "127.0.0.1"],
    ]


def test_request_trailers_are_not_forwarded(echo_proxy: PorticoProcess) -> None:
    body = chunked([b"abc", b"defg"], trailers=[("X-Checksum", "7")])
    echoed = echo(echo_proxy, "/trailers", [("TE", "trailers"), ("Trailer", "X-Checksum"),
                  ("Transfer-Encoding", "chunked")], body=body)  # fmt: skip
    assert echoed["chunked"] is True
    assert echoed["body_length"] == 7
    assert echoed["body_sha256"] == hashlib.sha256(b"abcdefg").hexdigest()
    assert echoed["trailers"] == []
    assert header_values(echoed, "TE") == header_values(echoed, "Trailer") == []
    assert header_values(echoed, "Transfer-Encoding") == ["chunked"]


def test_upgrade_is_forwarded_only_as_an_upgrade(echo_proxy: PorticoProcess) -> None:
    """Connection: Upgrade + Upgrade: the backend gets both (rewritten); it answers 200, so
    the client connection stays plain HTTP and serves the next request."""
    with RawConnection(echo_proxy.port) as conn:
        response = conn.request("GET", "/ws", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                               ("Sec-WebSocket-Version", "13")])  # fmt: skip
        assert response.status == 200
        echoed = response.json()
        assert header_values(echoed, "Upgrade") == ["websocket"]
        assert header_values(echoed, "Connection") == ["upgrade"]
        assert header_values(echoed, "Sec-WebSocket-Version") == ["13"]
        assert conn.request("GET", "/after-upgrade").json()["target"] == "/after-upgrade"


def without_date(response: RawResponse) -> list[tuple[str, str]]:
    """The response's fields but the one Date Portico adds (tests/integration/
    test_http_details.py checks it)."""
    assert len(response.header_values("Date")) == 1, response.raw
    return [(name, value) for name, value in response.headers if name != "Date"]


def test_hop_by_hop_response_headers_are_removed(scripted_proxy: PorticoProcess) -> None:
    with RawConnection(scripted_proxy.port) as conn:
        response = conn.request("GET", "/hop")
    assert response.status == 200 and response.body == b"ok"
    assert without_date(response) == [("X-Kept", "yes"), ("Content-Length", "2")]


def test_connection_cannot_strip_response_content_length(scripted_proxy: PorticoProcess) -> None:
    """An upstream naming Content-Length in Connection must not leave the client with an
    unframed body on a keep-alive connection (it would swallow the next response)."""
    with RawConnection(scripted_proxy.port) as conn:
        conn.send(build_request("GET", "/cl-token") + build_request("GET", "/length"))
        first = conn.recv_response(timeout=3)
        second = conn.recv_response(timeout=3)
    assert (first.status, first.header("Content-Length"), first.body) == (200, "5", b"hello")
    assert (second.status, second.body) == (200, b"ok")


def test_x_forwarded_headers_from_an_untrusted_client_are_replaced(
    echo_proxy: PorticoProcess,
) -> None:
    echoed = echo(echo_proxy, "/xff", [
        ("Host", "a.example:8080"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-For", "198.51.100.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Real-IP", "203.0.113.7"),
        ("Forwarded", "for=203.0.113.7;proto=https"),
    ])  # fmt: skip
    assert echoed["headers"] == [
        ["Host", "a.example:8080"],
        ["X-Forwarded-For", "127.0.0.1"],
        ["X-Forwarded-Proto", "http"],
        ["X-Forwarded-Host", "a.example:8080"],
        ["X-Real-IP", "127.0.0.1"],
    ]


def test_x_forwarded_headers_from_a_trusted_proxy_are_appended_or_kept(
    echo_proxy: PorticoProcess,
) -> None:
    echoed = request_from(TRUSTED_SOURCE, echo_proxy.port, "GET", "/xff", [
        ("Host", "a.example"),
        ("X-Forwarded-For", "203.0.113.7, 10.0.0.1"),
        ("X-Forwarded-For", "10.0.0.2"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "public.example"),
        ("X-Real-IP", "203.0.113.7"),
        ("Forwarded", "for=203.0.113.7;proto=https"),
    ])  # fmt: skip
    assert header_values(echoed, "X-Forwarded-For") == [
        f"203.0.113.7, 10.0.0.1, 10.0.0.2, {TRUSTED_SOURCE}"
    ]
    assert header_values(echoed, "X-Forwarded-Proto") == ["https"]
    assert header_values(echoed, "X-Forwarded-Host") == ["public.example"]
    assert header_values(echoed, "X-Real-IP") == ["203.0.113.7"]
    # Forwarded is off here: a trusted proxy's value passes through untouched.
    assert header_values(echoed, "Forwarded") == ["for=203.0.113.7;proto=https"]
    assert header_values(echoed, "Via") == []


def test_x_real_ip_is_the_peer_address(echo_proxy: PorticoProcess) -> None:
    """Untrusted or not, the address Portico adds is the connection's own peer address."""
    trusted = request_from(TRUSTED_SOURCE, echo_proxy.port, "GET", "/ip", [("Host", "a")])
    assert header_values(trusted, "X-Real-IP") == [TRUSTED_SOURCE]
    assert header_values(trusted, "X-Forwarded-For") == [TRUSTED_SOURCE]
    untrusted = request_from("127.0.0.3", echo_proxy.port, "GET", "/ip", [
        ("Host", "a"), ("X-Forwarded-For", "10.9.9.9"),
    ])  # fmt: skip
    assert header_values(untrusted, "X-Real-IP") == ["127.0.0.3"]
    assert header_values(untrusted, "X-Forwarded-For") == ["127.0.0.3"]


def test_forwarded_and_via_when_enabled(annotating_proxy: PorticoProcess) -> None:
    with RawConnection(annotating_proxy.port) as conn:
        response = conn.request("GET", "/fwd", [
            ("Forwarded", "for=203.0.113.7"), ("Via", "1.1 client-side"),
        ], host="a.example")  # fmt: skip
    echoed = response.json()
    assert header_values(echoed, "Forwarded") == ['for=127.0.0.1;proto=http;host="a.example"']
    assert header_values(echoed, "Via") == ["1.1 client-side, 1.1 edge"]
    assert response.header_values("Via") == ["1.1 edge"]
    assert header_values(echoed, "X-Forwarded-For") == ["127.0.0.1"]

    trusted = request_from(TRUSTED_SOURCE, annotating_proxy.port, "GET", "/fwd", [
        ("Host", "a.example"), ("Forwarded", "for=203.0.113.7;proto=https"),
    ])  # fmt: skip
    assert header_values(trusted, "Forwarded") == [
        f'for=203.0.113.7;proto=https, for={TRUSTED_SOURCE};proto=http;host="a.example"'
    ]

    raw = send_raw(annotating_proxy.port, b"GET /ten HTTP/1.0\r\nHost: a.example\r\n\r\n")
    assert b"\r\nVia: 1.1 edge\r\n" in raw
    body = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert header_values(body, "Via") == ["1.0 edge"]


def test_host_passes_through_unless_the_upstream_sets_it(
    echo_proxy: PorticoProcess, echo_backend: RawBackend
) -> None:
    passed = echo(echo_proxy, "/x", host="Client.Example:8080")
    assert header_values(passed, "Host") == ["Client.Example:8080"]
    renamed = echo(echo_proxy, "/renamed/x", host="client.example:8080")
    assert header_values(renamed, "Host") == ["backend.internal"]
    assert header_values(renamed, "X-Forwarded-Host") == ["client.example:8080"]
    assert renamed["target"] == "/renamed/x"


# --- request targets ------------------------------------------------------------------------

TARGETS = [
    "/a/../b/./c",
    "/a%2Fb%2f..%2F",
    "//double//slash//",
    "/~user/%7Euser/%7eUser",
    "/%00%ff%C3%A9%zz",
    "/x?q=%20+%2B&&a==b&;c",
    "/x??double?q=?",
    "/?",
    "/x?a=1&a=2&b[]=3&c={}",
    "/p;param=1/q;x?y=a:b@c!$'()*,",
    '/quote"less<than>back\\slash|pipe^caret`tick',
]


def test_request_target_is_forwarded_byte_for_byte(echo_proxy: PorticoProcess) -> None:
    with RawConnection(echo_proxy.port) as conn:
        for target in TARGETS:
            response = conn.request("GET", target)
            assert response.status == 200, target
            assert response.json()["target"] == target


@pytest.mark.parametrize("target", ["/..", "/%2e%2e/%2E%2e/etc/passwd", "/a/../../b", "/%2E./x"])
def test_path_climbing_above_the_root_is_refused(echo_proxy: PorticoProcess, target: str) -> None:
    # Routes match the normalized path; one that climbs above "/" has no normal form (nginx
    # answers 400 too), and the backend must never see it.
    with RawConnection(echo_proxy.port) as conn:
        response = conn.request("GET", target)
        assert response.status == 400


def test_absolute_form_target_becomes_origin_form(echo_proxy: PorticoProcess) -> None:
    cases = [
        ("http://origin.example:8080/p/../q?x=%2F", "/p/../q?x=%2F", "origin.example:8080"),
        ("http://origin.example?q=1", "/?q=1", "origin.example"),
        ("http://origin.example", "/", "origin.example"),
        ("HTTP://Origin.Example/other", "/other", "Origin.Example"),
    ]
    with RawConnection(echo_proxy.port) as conn:
        for absolute, target, authority in cases:
            echoed = conn.request("GET", absolute, host="ignored.example").json()
            assert echoed["target"] == target, absolute
            assert header_values(echoed, "Host") == [authority], absolute
            assert header_values(echoed, "X-Forwarded-Host") == [authority], absolute


def test_absolute_form_routes_by_its_authority(echo_proxy: PorticoProcess) -> None:
    echoed = echo(echo_proxy, "http://origin.example/renamed/yes", host="x")
    assert header_values(echoed, "Host") == ["backend.internal"]
    assert echoed["target"] == "/renamed/yes"


# --- HTTP/1.0 clients -----------------------------------------------------------------------


def test_http10_without_host_closes_after_the_response(
    echo_proxy: PorticoProcess, echo_backend: RawBackend
) -> None:
    with RawConnection(echo_proxy.port) as conn:
        conn.send(b"GET /ten HTTP/1.0\r\nUser-Agent: old\r\n\r\n")
        response = conn.recv_response()
        assert conn.closed(timeout=3)
    assert response.status == 200
    assert response.header("Connection") == "close"
    echoed = response.json()
    assert echoed["version"] == "HTTP/1.1"  # upstream always speaks 1.1
    assert header_values(echoed, "Host") == [f"127.0.0.1:{echo_backend.port}"]
    assert header_values(echoed, "X-Forwarded-Host") == []
    assert header_values(echoed, "Connection") == []


def test_http10_keep_alive(echo_proxy: PorticoProcess) -> None:
    with RawConnection(echo_proxy.port) as conn:
        for i in range(3):
            conn.send(b"GET /ka/%d HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n" % i)
            response = conn.recv_response()
            assert response.status == 200
            assert response.header("Connection") == "keep-alive"
            assert response.header("Content-Length") == str(len(response.body))
            echoed = response.json()
            assert echoed["target"] == f"/ka/{i}"
            assert header_values(echoed, "Connection") == []
        conn.send(b"GET /ka/last HTTP/1.0\r\nHost: a\r\n\r\n")  # no keep-alive: the last
        assert conn.recv_response().header("Connection") == "close"
        assert conn.closed(timeout=3)


# --- bodiless responses, interim responses, Expect ------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [("HEAD", "/whoami"), ("HEAD", "/bytes/5000"), ("GET", "/status/204"), ("GET", "/status/304")],
)
def test_bodiless_responses_carry_no_body(
    rr_proxy: PorticoProcess, method: str, target: str
) -> None:
    """Pipelined behind the bodiless response, the next response must parse from the very
    next byte: any body bytes or chunked framing would show up as a malformed second one."""
    with RawConnection(rr_proxy.port) as conn:
        conn.send(build_request(method, target) + build_request("GET", "/whoami"))
        first = conn.recv_response(head=method == "HEAD")
        second = conn.recv_response()
        assert conn.pending == b""
    expected_status = int(target.rsplit("/", 1)[1]) if "/status/" in target else 200
    assert first.status == expected_status
    assert first.raw.endswith(b"\r\n\r\n") and first.body == b""
    assert first.header("Transfer-Encoding") is None
    if target == "/whoami":
        assert int(first.header("Content-Length") or 0) > 0  # describes the GET body
    assert second.status == 200 and "instance" in second.json()


def test_early_hints_reach_http11_clients_only(scripted_proxy: PorticoProcess) -> None:
    with RawConnection(scripted_proxy.port) as conn:
        conn.send(build_request("GET", "/hints"))
        hints = conn.recv_response()
        final = conn.recv_response()
        assert conn.pending == b""
    assert (hints.status, hints.header("Link")) == (103, "</style.css>; rel=preload")
    assert hints.raw.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert (final.status, final.body) == (200, b"ok")
    raw = send_raw(scripted_proxy.port, b"GET /hints HTTP/1.0\r\nHost: a\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n\r\nok")
    assert b"103" not in raw


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_expect_100_continue(echo_proxy: PorticoProcess, framing: str) -> None:
    body = b"twelve bytes" * 100
    fields = [("Expect", "100-continue")]
    if framing == "chunked":
        fields.append(("Transfer-Encoding", "chunked"))
        wire = chunked([body[:500], body[500:]])
    else:
        fields.append(("Content-Length", str(len(body))))
        wire = body
    with RawConnection(echo_proxy.port) as conn:
        conn.send(build_request("POST", "/upload", fields))
        interim = conn.recv_response(timeout=3)
        assert interim.raw == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.send(wire)
        final = conn.recv_response()
    echoed = final.json()
    assert final.status == 200
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert header_values(echoed, "Expect") == []


# --- pipelining and upstream keep-alive -----------------------------------------------------


def test_pipelined_requests_are_answered_in_order(echo_proxy: PorticoProcess) -> None:
    requests = [
        build_request("GET", "/p/1"),
        build_request("POST", "/p/2", body=b"hello"),
        build_request("PUT", "/p/3", {"Transfer-Encoding": "chunked"}, chunked([b"ab", b"cde"])),
        build_request("HEAD", "/p/4"),
        build_request("DELETE", "/p/5"),
    ]
    with RawConnection(echo_proxy.port) as conn:
        conn.send(b"".join(requests))
        responses = [conn.recv_response(head=i == 3) for i in range(len(requests))]
        assert conn.pending == b""
    assert [r.header("X-Echo-Target") for r in responses] == [f"/p/{i}" for i in range(1, 6)]
    assert [r.header("X-Echo-Method") for r in responses] == [
        "GET", "POST", "PUT", "HEAD", "DELETE",
    ]  # fmt: skip
    assert [r.header("X-Echo-Body-Length") for r in responses] == ["0", "5", "5", "0", "0"]
    assert responses[3].body == b""


def test_pipelined_requests_to_several_backends_stay_in_order(rr_proxy: PorticoProcess) -> None:
    """The first answer is slowest; it must still come first."""
    with RawConnection(rr_proxy.port, timeout=10) as conn:
        conn.send(build_request("GET", "/sleep/0.3") + build_request("GET", "/whoami")
                  + build_request("POST", "/echo?x=1", body=b"pipelined body")
                  + build_request("GET", "/status/404"))  # fmt: skip
        first, second, third, fourth = (conn.recv_response() for _ in range(4))
    assert first.json()["slept"] == 0.3
    assert "instance" in second.json()
    assert third.json()["path"] == "/echo?x=1" and third.json()["body_length"] == 14
    assert (fourth.status, fourth.body) == (404, b"status 404\n")
    assert len({first.json()["instance"], second.json()["instance"], third.json()["instance"]}) == 3


def _echo_position(response: RawResponse) -> tuple[int, int]:
    """(backend connection index, request number on it) from echo_http's headers."""
    return int(response.header("X-Echo-Connection") or -1), int(
        response.header("X-Echo-Request-Number") or -1
    )


def test_upstream_connections_are_reused(echo_proxy: PorticoProcess) -> None:
    """Sequential requests, from one client connection or many, ride one warm upstream
    connection: same connection index, consecutive request numbers."""
    seen: list[tuple[int, int]] = []
    with RawConnection(echo_proxy.port) as conn:
        for i in range(15):
            seen.append(_echo_position(conn.request("GET", f"/reuse/{i}")))
    for i in range(15):
        with RawConnection(echo_proxy.port) as conn:
            seen.append(_echo_position(conn.request("POST", f"/reuse/new/{i}", body=b"x" * i)))
    connection, first = seen[0]
    assert connection >= 0
    assert seen == [(connection, first + i) for i in range(30)]


# --- re-framing -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/chunked", "/close"])
def test_unsized_upstream_body_is_chunked_for_http11(
    scripted_proxy: PorticoProcess, target: str
) -> None:
    expected = b"hello world" if target == "/chunked" else CLOSE_BODY
    with RawConnection(scripted_proxy.port) as conn:
        conn.send(build_request("GET", target) + build_request("GET", target))
        responses = [conn.recv_response(), conn.recv_response()]  # keep-alive survives
        assert conn.pending == b""
    for response in responses:
        assert response.status == 200
        assert response.chunked and response.body == expected
        assert response.trailers == []  # trailers and chunk extensions are dropped
        assert response.header("Content-Length") is None
        assert response.header("Trailer") is None
        assert response.header("Connection") is None
        assert response.header_values("Transfer-Encoding") == ["chunked"]


@pytest.mark.parametrize("target", ["/chunked", "/close"])
@pytest.mark.parametrize("connection", ["", "Connection: keep-alive\r\n"])
def test_unsized_upstream_body_is_close_delimited_for_http10(
    scripted_proxy: PorticoProcess, target: str, connection: str
) -> None:
    expected = b"hello world" if target == "/chunked" else CLOSE_BODY
    request = f"GET {target} HTTP/1.0\r\nHost: a\r\n{connection}\r\n".encode()
    with RawConnection(scripted_proxy.port) as conn:
        conn.send(request)
        response = conn.recv_response()  # no framing headers: read to EOF
        assert conn.closed(timeout=1)
    assert response.status == 200 and response.body == expected
    assert response.header("Transfer-Encoding") is None
    assert response.header("Content-Length") is None
    assert response.header("Connection") == "close"


def test_sized_upstream_body_keeps_its_length_for_http10(scripted_proxy: PorticoProcess) -> None:
    with RawConnection(scripted_proxy.port) as conn:
        conn.send(b"GET /length HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n" * 2)
        for _ in range(2):
            response = conn.recv_response()
            assert without_date(response) == [
                ("Content-Type", "text/plain"), ("Content-Length", "2"),
                ("Connection", "keep-alive"),
            ]  # fmt: skip
            assert response.body == b"ok"


def test_large_chunked_flask_body_is_rechunked_intact(rr_proxy: PorticoProcess) -> None:
    n = 300_000
    with RawConnection(rr_proxy.port, timeout=10) as conn:
        chunked_response = conn.request("GET", f"/bytes/{n}")
        sized = conn.request("GET", f"/bytes/{n}?cl=1")
    assert chunked_response.chunked and chunked_response.body == pattern(n)
    assert not sized.chunked and sized.header("Content-Length") == str(n)
    assert sized.body == pattern(n)
    raw = send_raw(rr_proxy.port, f"GET /bytes/{n} HTTP/1.0\r\nHost: a\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    assert body == pattern(n)


# --- access log -----------------------------------------------------------------------------

CLF_TIME = r"\[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000\]"


@pytest.mark.parametrize("fmt", ["common", "combined", "json"])
def test_access_log_has_one_line_per_request(
    portico: PorticoFactory, raw_backend: RawBackendFactory, tmp_path: Path, fmt: str
) -> None:
    backend = raw_backend(echo_http())
    log_path = tmp_path / "access.log"
    proxy = portico({
        "access_log": {"format": fmt, "path": str(log_path)},
        "upstreams": {"app": {"backends": [backend.url]}},
        "routes": [{"path": "/log/", "upstream": "app"}],
    })  # fmt: skip
    with RawConnection(proxy.port) as conn:
        one = conn.request("GET", "/log/one?x=1", [("Referer", "http://ref.example/p"),
                                                   ("User-Agent", "agent/1.0")])  # fmt: skip
        two = conn.request("POST", "/log/two", body=b"12345")
        missing = conn.request("GET", "/elsewhere")
    assert (one.status, two.status, missing.status) == (200, 200, 404)
    assert missing.body == b"404 Not Found\n"
    started = time.monotonic()
    lines = wait_until(
        lambda: log_path.exists() and len(text := log_path.read_text().splitlines()) >= 3 and text,
        timeout=3,
        message="three access log lines",
    )
    assert time.monotonic() - started < 2.0, "access log not flushed within about a second"
    assert len(lines) == 3, lines
    if fmt == "json":
        records = [json.loads(line) for line in lines]
        expected = [
            ("GET", "/log/one?x=1", 200, len(one.body), "http://ref.example/p", "agent/1.0"),
            ("POST", "/log/two", 200, len(two.body), None, None),
            ("GET", "/elsewhere", 404, len(missing.body), None, None),
        ]
        for record, (method, target, status, sent, referer, agent) in zip(
            records, expected, strict=True
        ):
            assert record["client"] == "127.0.0.1"
            assert record["request"] == f"{method} {target} HTTP/1.1"
            assert record["method"] == method
            assert record["target"] == target
            assert record["status"] == status
            assert record["bytes"] == sent  # body bytes, Portico's own error body too
            assert (record["referer"], record["user_agent"]) == (referer, agent)
            assert record["duration_ms"] >= 0
            assert abs(record["time"] - time.time()) < 30
        assert [r["endpoint"] for r in records] == [f"127.0.0.1:{backend.port}"] * 2 + [None]
        assert [r["upstream"] for r in records] == ["app", "app", None]
        assert [r["route"] for r in records] == [records[0]["route"]] * 2 + [None]
        assert [r["tries"] for r in records] == [1, 1, 0]
        assert [r["bytes_received"] for r in records] == [0, 5, 0]
        assert all(r["upstream_header_ms"] >= 0 for r in records[:2])
        assert records[2]["upstream_header_ms"] is None
        return
    tail = [' "http://ref.example/p" "agent/1.0"', ' "-" "-"', ' "-" "-"']
    expected_lines = [
        (r'"GET /log/one\?x=1 HTTP/1\.1" 200 ' + str(len(one.body)), tail[0]),
        (r'"POST /log/two HTTP/1\.1" 200 ' + str(len(two.body)), tail[1]),
        (r'"GET /elsewhere HTTP/1\.1" 404 ' + str(len(missing.body)), tail[2]),
    ]
    for line, (request_status_bytes, combined_tail) in zip(lines, expected_lines, strict=True):
        suffix = re.escape(combined_tail) if fmt == "combined" else ""
        pattern_ = rf"^127\.0\.0\.1 - - {CLF_TIME} {request_status_bytes}{suffix}$"
        assert re.match(pattern_, line), (line, pattern_)
