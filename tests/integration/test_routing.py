"""Route matching over real sockets: every matcher, the precedence rules, 404 and path
normalization.

One proxy serves the whole module. Most of its routes answer by themselves (``respond``) with
their own name as the body, so a request shows at once which route took it; the ``/api/``
route proxies to an ``echo_http`` backend, which shows the path the upstream received.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.support.backends import RawBackend, echo_http
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import Headers, RawConnection, build_request, send_raw

pytestmark = pytest.mark.timeout(60)

# A client from here is a trusted proxy: its X-Forwarded-For names the real client. Every other
# loopback address is a direct, untrusted client. Linux routes all of 127.0.0.0/8 to lo.
TRUSTED_SOURCE = "127.0.0.2"
OTHER_SOURCE = "127.0.0.3"


def say(name: str, **match: Any) -> dict[str, Any]:
    """A route that answers with its own name."""
    return {"name": name, **match, "respond": {"body": name}}


ROUTES: list[dict[str, Any]] = [
    # hosts: exact, wildcard (any depth below it), a longer wildcard, a list
    say("host-exact", host="api.example.test"),
    say("host-wild", host="*.example.test"),
    say("host-wild-deep", host="*.deep.example.test"),
    say("host-list", host=["one.test", "two.test"]),
    # paths: exact beats regex beats prefix; longer prefixes first
    say("exact", path_exact="/exact"),
    say("exact-prefix", path="/exact"),
    say("items-prefix", path="/items/"),
    say("items-regex", path_regex="^/items/(?P<id>[0-9]+)$"),
    say("short", path="/a/"),
    say("long", path="/a/b/"),
    # methods
    say("any-method", path="/m/"),
    say("post-put", path="/m/", methods=["post", "PUT"]),
    # headers: the route without conditions comes first in the file and still loses
    say("h-none", path="/h/"),
    say("h-exact", path="/h/", headers={"X-Env": "prod"}),
    say("h-present", path="/h/", headers={"X-Flag": {"present": True}}),
    say("h-regex", path="/h/", headers={"User-Agent": {"regex": "^curl/[0-9]"}}),
    say("h-absent", path="/h/", headers={"X-Block": {"present": False}}),
    # query parameters
    say("q-none", path="/q/"),
    say("q-exact", path="/q/", query={"v": "2"}),
    say("q-present", path="/q/", query={"debug": {"present": True}}),
    say("q-regex", path="/q/", query={"id": {"regex": "^[0-9]+$"}}),
    # client networks, after trusted-proxy resolution
    say("c-none", path="/c/"),
    say("c-ten", path="/c/", clients=["10.0.0.0/8"]),
    say("c-other", path="/c/", clients=[f"{OTHER_SOURCE}/32", "2001:db8::/32"]),
    # priority beats specificity
    say("p-specific", path="/p/deep/", headers={"X-Env": "prod"}),
    say("p-priority", path="/p/", priority=5),
]


@pytest.fixture(scope="module")
def echo() -> Iterator[RawBackend]:
    with RawBackend(echo_http()) as backend:
        yield backend


@pytest.fixture(scope="module")
def proxy(echo: RawBackend) -> Iterator[PorticoProcess]:
    config = {
        "server": {"shutdown_grace": 0.5},
        "forwarding": {"trusted_proxies": [TRUSTED_SOURCE]},
        "upstreams": {"echo": {"backends": [echo.url]}},
        "routes": [*ROUTES, {"name": "api", "path": "/api/", "upstream": "echo"}],
    }
    with PorticoProcess(config) as proc:
        yield proc


@pytest.fixture
def conn(proxy: PorticoProcess) -> Iterator[RawConnection]:
    with RawConnection(proxy.port) as c:
        yield c


def route_of(
    conn: RawConnection,
    target: str,
    headers: Headers = (),
    *,
    host: str = "127.0.0.1",
    method: str = "GET",
) -> str:
    """The name of the route that answered (every test route says its name), or the status."""
    response = conn.request(method, target, headers, host=host)
    if response.status != 200:
        return str(response.status)
    return response.body.decode()


# --- hosts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.test", "host-exact"),
        ("API.Example.TEST:8080", "host-exact"),  # case and port do not matter
        ("www.example.test", "host-wild"),
        ("a.b.c.example.test", "host-wild"),  # a wildcard covers every level below it
        ("x.deep.example.test", "host-wild-deep"),  # the longer wildcard wins
        ("a.x.deep.example.test", "host-wild-deep"),
        ("one.test", "host-list"),
        ("two.test:81", "host-list"),
        ("example.test", "404"),  # *.example.test does not cover example.test itself
        ("three.test", "404"),
        ("notexample.test", "404"),  # a suffix match is on a dot boundary
    ],
)
def test_host_matching(conn: RawConnection, host: str, expected: str) -> None:
    assert route_of(conn, "/anything", host=host) == expected


def test_absolute_form_authority_is_the_host(conn: RawConnection) -> None:
    assert route_of(conn, "http://api.example.test/x", host="other.test") == "host-exact"


def test_a_host_route_beats_a_longer_path_without_host(conn: RawConnection) -> None:
    # Documented precedence: the host is ranked before the path.
    assert route_of(conn, "/a/b/c", host="api.example.test") == "host-exact"
    assert route_of(conn, "/a/b/c") == "long"


# --- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/exact", "exact"),
        ("/exact?x=1", "exact"),  # the query is not part of the path
        ("/exactly", "exact-prefix"),
        ("/exact/", "exact-prefix"),
        ("/items/42", "items-regex"),
        ("/items/42/more", "items-prefix"),  # the regex is anchored
        ("/items/abc", "items-prefix"),
        ("/a/c", "short"),
        ("/a/b/c", "long"),
        ("/a/b", "short"),  # "/a/b/" is a byte prefix: /a/b is not under it
        ("/nothing", "404"),
        ("/", "404"),
    ],
)
def test_path_matching_and_precedence(conn: RawConnection, target: str, expected: str) -> None:
    assert route_of(conn, target) == expected


def test_methods(conn: RawConnection) -> None:
    assert route_of(conn, "/m/x", method="POST") == "post-put"
    assert route_of(conn, "/m/x", method="PUT") == "post-put"
    assert route_of(conn, "/m/x", method="GET") == "any-method"
    assert route_of(conn, "/m/x", method="DELETE") == "any-method"


# --- headers and query ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-Env": "prod"}, "h-exact"),
        ({"x-env": "prod"}, "h-exact"),  # header names are case-insensitive
        ({"X-Env": "production", "X-Block": "1"}, "h-none"),  # exact means exact
        ({"X-Flag": "", "X-Block": "1"}, "h-present"),  # present, even empty
        ({"User-Agent": "curl/8.5.0", "X-Block": "1"}, "h-regex"),
        ({"User-Agent": "Mozilla/5.0 curl/8", "X-Block": "1"}, "h-none"),
        ({}, "h-absent"),
        ({"X-Block": "1"}, "h-none"),
    ],
)
def test_header_matching(conn: RawConnection, headers: Mapping[str, str], expected: str) -> None:
    assert route_of(conn, "/h/x", headers) == expected


def test_header_exact_matches_any_of_repeated_fields(conn: RawConnection) -> None:
    headers = [("X-Env", "dev"), ("X-Env", "prod"), ("X-Block", "1")]
    assert route_of(conn, "/h/x", headers) == "h-exact"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("?v=2", "q-exact"),
        ("?a=1&v=2", "q-exact"),
        ("?v=20", "q-none"),
        ("?debug", "q-present"),
        ("?debug=", "q-present"),
        ("?id=123", "q-regex"),
        ("?id=12a", "q-none"),
        ("", "q-none"),
    ],
)
def test_query_matching(conn: RawConnection, query: str, expected: str) -> None:
    assert route_of(conn, "/q/x" + query) == expected


# --- client networks ----------------------------------------------------------------------------


def client_route(proxy: PorticoProcess, source: str, headers: Headers = ()) -> str:
    with RawConnection(proxy.port, source=source) as c:
        return route_of(c, "/c/x", headers)


def test_clients_by_peer_address(proxy: PorticoProcess) -> None:
    assert client_route(proxy, OTHER_SOURCE) == "c-other"
    assert client_route(proxy, "127.0.0.1") == "c-none"


def test_clients_after_trusted_forwarded_for(proxy: PorticoProcess) -> None:
    xff = {"X-Forwarded-For": "10.1.2.3"}
    assert client_route(proxy, TRUSTED_SOURCE, xff) == "c-ten"
    # The rightmost untrusted address is the client, as nginx's real_ip_recursive does.
    assert client_route(proxy, TRUSTED_SOURCE, {"X-Forwarded-For": "10.9.9.9, 192.0.2.1"}) == (
        "c-none"
    )
    assert client_route(proxy, TRUSTED_SOURCE, {"X-Forwarded-For": "2001:db8::1"}) == "c-other"
    # Trusted hops are skipped from the right until the first address that is not trusted.
    hops = {"X-Forwarded-For": f"10.1.2.3, {TRUSTED_SOURCE}"}
    assert client_route(proxy, TRUSTED_SOURCE, hops) == "c-ten"


def test_untrusted_forwarded_for_is_ignored(proxy: PorticoProcess) -> None:
    assert client_route(proxy, "127.0.0.1", {"X-Forwarded-For": "10.1.2.3"}) == "c-none"
    assert client_route(proxy, OTHER_SOURCE, {"X-Forwarded-For": "10.1.2.3"}) == "c-other"


# --- priority -----------------------------------------------------------------------------------


def test_priority_beats_specificity(conn: RawConnection) -> None:
    assert route_of(conn, "/p/deep/x", {"X-Env": "prod"}) == "p-priority"


# --- path normalization -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["/%61pi/v", "/x/../api/v", "/api/./v", "//api//v", "/%61%70%69/v", "/api/w/../v"],
)
def test_spellings_of_a_path_reach_its_route(
    conn: RawConnection, echo: RawBackend, target: str
) -> None:
    response = conn.request("GET", target + "?q=%2e%2e")
    assert response.status == 200, response.raw
    # Routed by its normal form, forwarded as it came (no stage rewrote it).
    assert response.json()["target"] == target + "?q=%2e%2e"


def test_encoded_slash_is_not_decoded(conn: RawConnection) -> None:
    response = conn.request("GET", "/api%2Fv")
    assert response.status == 404  # "/api%2Fv" is one segment, not under /api/


@pytest.mark.parametrize("target", ["/..", "/../api/v", "/api/../../x", "/%2e%2e/api/v"])
def test_a_path_above_the_root_is_400(proxy: PorticoProcess, target: str) -> None:
    data = send_raw(proxy.port, build_request("GET", target, {"Connection": "close"}))
    assert data.startswith(b"HTTP/1.1 400 "), data
