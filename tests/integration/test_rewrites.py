"""Rewrites, redirects, fixed answers and header rules over real sockets.

``echo_http`` shows exactly what the upstream received (target, headers); ``app`` is a raw
backend playing an application that knows nothing of the prefix it is mounted under: it answers
with whatever ``Location``, ``Set-Cookie`` and other headers the request asks for
(``X-Want-Location``, ``X-Want-Cookie``, ``X-Want-Header: Name: value``), so each test states
the app's answer and checks what the client got.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import RawBackend, echo_http, read_request
from tests.support.ports import free_port
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection, RawResponse
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


async def app_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while (request := await read_request(reader)) is not None:
        fields = [("Content-Length", "0"), ("X-App-Target", request.target)]
        fields += [("Location", v) for k, v in request.headers if k.lower() == "x-want-location"]
        fields += [("Set-Cookie", v) for k, v in request.headers if k.lower() == "x-want-cookie"]
        for k, v in request.headers:
            if k.lower() == "x-want-header":
                name, _, value = v.partition(": ")
                fields.append((name, value))
        head = "HTTP/1.1 302 Found\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields)
        writer.write((head + "\r\n").encode("latin-1"))
        await writer.drain()


@pytest.fixture(scope="module")
def echo() -> Iterator[RawBackend]:
    with RawBackend(echo_http()) as backend:
        yield backend


@pytest.fixture(scope="module")
def app() -> Iterator[RawBackend]:
    with RawBackend(app_handler, port=free_port()) as backend:
        yield backend


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rewrites") / "access.log"


def routes() -> list[dict[str, Any]]:
    return [
        # path rewrites
        {"name": "strip", "path": "/strip/", "strip_prefix": "/strip", "upstream": "echo"},
        {"name": "add", "path": "/add/", "add_prefix": "/v2", "upstream": "echo"},
        {
            "name": "both",
            "path": "/both/",
            "strip_prefix": "/both",
            "add_prefix": "/inner/",
            "upstream": "echo",
        },
        {
            "name": "regex",
            "path_regex": "^/users/(?P<id>[0-9]+)/profile$",
            "rewrite": {"regex": "^/users/([0-9]+)/(pro)file$", "to": "/{2}files/{1}-{id}"},
            "upstream": "echo",
        },
        {"name": "host", "path": "/hh/", "host_header": "backend.internal", "upstream": "echo"},
        # redirects
        {
            "name": "r301",
            "path_regex": "^/old/(?P<rest>.*)$",
            "redirect": {"to": "/new/{rest}", "status": 301},
        },
        {"name": "r302", "path_exact": "/r302", "redirect": {"to": "https://{host}/moved{path}"}},
        {
            "name": "r303",
            "path_exact": "/r303",
            "redirect": {"to": "/see?from={path}", "status": 303},
        },
        {
            "name": "r307",
            "path_exact": "/r307",
            "redirect": {"to": "{scheme}://{hostname}:9443{path}{query}#top", "status": 307},
        },
        {
            "name": "r308",
            "path_regex": "^/r308/([a-z]+)$",
            "redirect": {"to": "/{1}/{method}/{{literal}}", "status": 308},
        },
        {"name": "https", "host": "secure.test", "redirect": "https"},
        # fixed answers
        {
            "name": "teapot",
            "path_exact": "/respond",
            "respond": {
                "status": 403,
                "body": "no entry to {path} via {route}\n",
                "content_type": "text/html; charset=utf-8",
                "headers": {"Cache-Control": "no-store", "X-Extra": "1"},
            },
        },
        {"name": "empty", "path_exact": "/empty", "respond": {"status": 204}},
        # header rules
        {
            "name": "hdr",
            "path": "/hdr/",
            "upstream": "echo",
            "request_headers": {
                "set": {
                    "X-Client": "{client_ip}",
                    "X-Req": "{request_id}",
                    "X-Host": "{host}",
                    "X-Hostname": "{hostname}",
                    "X-Scheme": "{scheme}",
                    "X-Route": "{route}",
                    "X-Method": "{method}",
                    "X-Where": "{path}{query}",
                    "X-Replace": "new",
                },
                "add": {"X-Multi": "added"},
                "remove": ["X-Debug"],
            },
            "response_headers": {
                "set": {"X-Frame-Options": "DENY", "X-Echo-Method": "overridden"},
                "add": {"X-Served-By": "{route} for {client_ip}"},
                "remove": ["X-Echo-Body-Sha256"],
            },
        },
        {
            "name": "cap",
            "path_regex": "^/cap/(?P<name>[^/]+)$",
            "upstream": "echo",
            "request_headers": {"set": {"X-Name": "<{name}>"}},
            "response_headers": {"set": {"X-Name": "<{name}>"}},
        },
        # prefix-stripped applications
        {
            "name": "app",
            "path": "/app/",
            "strip_prefix": "/app",
            "upstream": "app",
            "cookie_domain": {"backend.internal": "example.test"},
        },
        {
            "name": "app2",
            "path": "/app2/",
            "strip_prefix": "/app2",
            "add_prefix": "/base",
            "upstream": "app",
        },
        {
            "name": "app-rules",
            "path": "/app-rules/",
            "upstream": "app",
            "response_headers": {"set": {"X-Frame-Options": "DENY"}},
        },
        {
            "name": "raw",
            "path": "/raw/",
            "strip_prefix": "/raw",
            "rewrite_location": False,
            "cookie_path": False,
            "upstream": "app",
        },
    ]


@pytest.fixture(scope="module")
def proxy(echo: RawBackend, app: RawBackend, log_path: Path) -> Iterator[PorticoProcess]:
    config = {
        "request_id": True,
        "server": {"shutdown_grace": 0.5},
        "access_log": {"format": "json", "path": str(log_path)},
        "upstreams": {"echo": {"backends": [echo.url]}, "app": {"backends": [app.url]}},
        "routes": routes(),
    }
    with PorticoProcess(config) as proc:
        yield proc


@pytest.fixture
def conn(proxy: PorticoProcess) -> Iterator[RawConnection]:
    with RawConnection(proxy.port) as c:
        yield c


def echoed(response: RawResponse) -> dict[str, Any]:
    assert response.status == 200, response.raw
    data: dict[str, Any] = response.json()
    return data


def upstream_headers(response: RawResponse, name: str) -> list[str]:
    return [v for k, v in echoed(response)["headers"] if k.lower() == name.lower()]


def log_entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --- path rewrites ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "upstream_target"),
    [
        ("/strip/x?q=1", "/x?q=1"),
        ("/strip/", "/"),
        ("/%73trip/a/../x?q", "/x?q"),  # a rewrite starts from the normal form of the path
        ("/add/x?q=1", "/v2/add/x?q=1"),
        ("/both/x/y?z", "/inner/x/y?z"),
        ("/users/42/profile?tab=1", "/profiles/42-42?tab=1"),
    ],
)
def test_the_backend_sees_the_rewritten_target(
    conn: RawConnection, target: str, upstream_target: str
) -> None:
    assert echoed(conn.request("GET", target))["target"] == upstream_target


def test_the_access_log_shows_the_original_target(
    proxy: PorticoProcess, conn: RawConnection, log_path: Path
) -> None:
    marker = "q=logged-original"
    assert echoed(conn.request("GET", f"/strip/deep/path?{marker}"))["target"] == (
        f"/deep/path?{marker}"
    )
    entry = wait_until(
        lambda: next((e for e in log_entries(log_path) if marker in e["request"]), None),
        timeout=5,
        message="the access log line",
    )
    assert entry is not None
    assert entry["request"] == f"GET /strip/deep/path?{marker} HTTP/1.1"
    assert entry["status"] == 200
    assert REQUEST_ID.match(entry["request_id"])


def test_host_header_per_route(conn: RawConnection) -> None:
    response = conn.request("GET", "/hh/x", host="public.test:8080")
    assert upstream_headers(response, "Host") == ["backend.internal"]
    # The original host still travels, in X-Forwarded-Host.
    assert upstream_headers(response, "X-Forwarded-Host") == ["public.test:8080"]
    other = conn.request("GET", "/strip/x", host="public.test:8080")
    assert upstream_headers(other, "Host") == ["public.test:8080"]


# --- redirects ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "status", "location"),
    [
        ("GET", "/old/a/b.html", 301, "/new/a/b.html"),
        ("GET", "/old/a?x=1&y=2", 301, "/new/a?x=1&y=2"),  # the query is kept
        ("GET", "/r302?k=v", 302, "https://site.test:8080/moved/r302?k=v"),
        ("GET", "/r303?k=v", 303, "/see?from=/r303"),  # the target gives its own query
        ("POST", "/r307?k=v", 307, "http://site.test:9443/r307?k=v#top"),
        ("PUT", "/r308/abc?k", 308, "/abc/PUT/{literal}?k"),
    ],
)
def test_redirects(
    conn: RawConnection, method: str, target: str, status: int, location: str
) -> None:
    response = conn.request(method, target, host="site.test:8080")
    assert response.status == status
    assert response.header_values("Location") == [location]
    assert REQUEST_ID.match(response.header("X-Request-ID") or "")
    # A kept-alive connection goes on after a redirect.
    assert conn.request("GET", "/strip/after").status == 200


def test_https_redirect_shortcut(conn: RawConnection) -> None:
    # 308 keeps the method: a POST sent over plain HTTP is not turned into a GET.
    for method in ("GET", "POST"):
        response = conn.request(method, "/a/b?c=d", host="secure.test:8080")
        assert response.status == 308
        assert response.header("Location") == "https://secure.test/a/b?c=d"


# --- fixed answers ------------------------------------------------------------------------------


def test_respond(conn: RawConnection) -> None:
    response = conn.request("GET", "/respond?x")
    assert response.status == 403
    assert response.body == b"no entry to /respond via teapot\n"
    assert response.header("Content-Type") == "text/html; charset=utf-8"
    assert response.header("Cache-Control") == "no-store"
    assert response.header("X-Extra") == "1"
    assert response.header("Content-Length") == str(len(response.body))
    head = conn.request("HEAD", "/respond")
    assert head.status == 403 and head.body == b""
    assert head.header("Content-Length") == str(len(response.body))
    empty = conn.request("GET", "/empty")
    assert empty.status == 204 and empty.header("Content-Type") is None
    assert empty.header("Content-Length") is None  # RFC 9110 8.6
    assert conn.request("GET", "/respond").status == 403  # nothing extra was written


def test_respond_after_a_request_body_keeps_the_connection_in_step(conn: RawConnection) -> None:
    # The answer does not wait for the body; the body is still read and dropped, so the next
    # request on the connection is parsed from the right place.
    conn.send(b"POST /respond HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    assert conn.recv_response().status == 403
    conn.send(b"0123456789GET /strip/next HTTP/1.1\r\nHost: x\r\n\r\n")
    assert echoed(conn.recv_response())["target"] == "/next"
    conn.send(b"POST /respond HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    response = conn.recv_response()
    assert response.status == 403 and response.header("Connection") == "close"
    assert conn.closed(timeout=2)


# --- header rules -------------------------------------------------------------------------------


def test_request_header_rules_with_templates(conn: RawConnection) -> None:
    response = conn.request(
        "PATCH",
        "/hdr/x?y=1",
        [("X-Replace", "old"), ("X-Replace", "older"), ("X-Multi", "orig"), ("X-Debug", "1")],
        host="site.test:8080",
    )
    got = {k.lower(): v for k, v in echoed(response)["headers"]}
    request_id = response.header("X-Request-ID")
    assert request_id is not None and REQUEST_ID.match(request_id)
    assert got["x-client"] == "127.0.0.1"
    assert got["x-req"] == request_id == got["x-request-id"]
    assert got["x-host"] == "site.test:8080"
    assert got["x-hostname"] == "site.test"
    assert got["x-scheme"] == "http"
    assert got["x-route"] == "hdr"
    assert got["x-method"] == "PATCH"
    assert got["x-where"] == "/hdr/x?y=1"
    assert upstream_headers(response, "X-Replace") == ["new"]
    assert upstream_headers(response, "X-Multi") == ["orig", "added"]
    assert upstream_headers(response, "X-Debug") == []


def test_a_client_cannot_drop_a_set_header_by_naming_it_in_connection(
    conn: RawConnection,
) -> None:
    headers = [("Connection", "X-Replace, X-Multi, X-Other"), ("X-Multi", "hop"), ("X-Other", "o")]
    response = conn.request("GET", "/hdr/x", headers)
    assert upstream_headers(response, "X-Replace") == ["new"]
    assert upstream_headers(response, "X-Multi") == ["added"]  # the client's own is hop-by-hop
    assert upstream_headers(response, "X-Other") == []


def test_a_backend_cannot_drop_a_set_header_by_naming_it_in_connection(
    conn: RawConnection,
) -> None:
    wanted = [
        ("X-Want-Header", "Connection: X-Frame-Options, X-Hop"),
        ("X-Want-Header", "X-Frame-Options: SAMEORIGIN"),
        ("X-Want-Header", "X-Hop: 1"),
    ]
    response = conn.request("GET", "/app-rules/x", wanted)
    assert response.header_values("X-Frame-Options") == ["DENY"]
    assert response.header("X-Hop") is None  # still hop-by-hop


def test_response_header_rules_with_templates(conn: RawConnection) -> None:
    response = conn.request("GET", "/hdr/x")
    assert response.header_values("X-Frame-Options") == ["DENY"]
    assert response.header_values("X-Echo-Method") == ["overridden"]
    assert response.header_values("X-Served-By") == ["hdr for 127.0.0.1"]
    assert response.header("X-Echo-Body-Sha256") is None
    assert response.header("X-Echo-Target") == "/hdr/x"  # untouched headers pass through


def test_captures_in_header_rules(conn: RawConnection) -> None:
    response = conn.request("GET", "/cap/alice")
    assert upstream_headers(response, "X-Name") == ["<alice>"]
    assert response.header_values("X-Name") == ["<alice>"]


# --- Location and Set-Cookie of a prefix-stripped app ---------------------------------------------


def app_answer(
    conn: RawConnection, target: str, location: str | None = None, cookies: tuple[str, ...] = ()
) -> RawResponse:
    headers = [("X-Want-Cookie", c) for c in cookies]
    if location is not None:
        headers.append(("X-Want-Location", location))
    response = conn.request("GET", target, headers, host="gw.test:8080")
    assert response.status == 302, response.raw
    return response


def test_location_of_a_prefix_stripped_app(conn: RawConnection, app: RawBackend) -> None:
    response = app_answer(conn, "/app/account", "/login?next=/account")
    assert response.header("X-App-Target") == "/account"
    assert response.header("Location") == "/app/login?next=/account"
    # The app naming its own address is pointed at the gateway instead.
    absolute = f"http://127.0.0.1:{app.port}/login"
    assert app_answer(conn, "/app/", absolute).header("Location") == (
        "http://gw.test:8080/app/login"
    )
    # An absolute URL built from the Host the app was sent (the client's) gets the prefix.
    assert app_answer(conn, "/app/", "https://gw.test:8080/login?x").header("Location") == (
        "https://gw.test:8080/app/login?x"
    )
    # Another site, and a scheme-relative URL, are left alone.
    for elsewhere in ("https://id.example.org/login", "//cdn.test/x"):
        assert app_answer(conn, "/app/", elsewhere).header("Location") == elsewhere


def test_location_with_strip_and_add_prefix(conn: RawConnection) -> None:
    response = app_answer(conn, "/app2/x", "/base/login")
    assert response.header("X-App-Target") == "/base/x"
    assert response.header("Location") == "/app2/login"
    # Outside what the route maps: left alone.
    assert app_answer(conn, "/app2/x", "/other").header("Location") == "/other"


def test_set_cookie_path_and_domain_of_a_prefix_stripped_app(conn: RawConnection) -> None:
    response = app_answer(
        conn,
        "/app/x",
        cookies=(
            "sid=1; Path=/; Domain=backend.internal; HttpOnly",
            "pref=x; path=/settings; Secure",
            "other=y; Domain=.Backend.Internal",
            "third=z; Domain=elsewhere.test; Path=/app/kept",
            "plain=1",
        ),
    )
    assert response.header_values("Set-Cookie") == [
        "sid=1; Path=/app/; Domain=example.test; HttpOnly",
        "pref=x; Path=/app/settings; Secure",
        "other=y; Domain=example.test",
        "third=z; Domain=elsewhere.test; Path=/app/kept",
        "plain=1",
    ]


def test_prefix_fixes_can_be_turned_off(conn: RawConnection) -> None:
    response = app_answer(conn, "/raw/x", "/login", cookies=("sid=1; Path=/",))
    assert response.header("X-App-Target") == "/x"
    assert response.header("Location") == "/login"
    assert response.header_values("Set-Cookie") == ["sid=1; Path=/"]


# --- no rule can inject CR/LF ---------------------------------------------------------------------


def test_encoded_crlf_in_a_capture_stays_encoded(conn: RawConnection) -> None:
    response = conn.request("GET", "/cap/a%0d%0aX-Evil:%20yes")
    assert upstream_headers(response, "X-Evil") == []
    assert upstream_headers(response, "X-Name") == ["<a%0D%0AX-Evil:%20yes>"]
    assert response.header("X-Evil") is None
    redirect = conn.request("GET", "/old/x%0D%0ASet-Cookie:%20evil=1%0d%0a")
    assert redirect.status == 301
    assert redirect.header("Set-Cookie") is None
    assert redirect.header("Location") == "/new/x%0D%0ASet-Cookie:%20evil=1%0D%0A"


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /cap/a\rX-Evil: 1 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /hdr/x HTTP/1.1\r\nHost: x\r\nX-Debug: a\rX-Evil: 1\r\n\r\n",
        b"GET /hdr/x HTTP/1.1\r\nHost: x\rX-Evil: 1\r\n\r\n",
        b"GET /hdr/x HTTP/1.1\r\nHost: x\r\nX-Multi: a\x00b\r\n\r\n",
    ],
)
def test_raw_cr_lf_or_nul_in_a_request_never_reaches_a_head(
    proxy: PorticoProcess, echo: RawBackend, raw: bytes
) -> None:
    before = echo.connections
    with RawConnection(proxy.port) as c:
        c.send(raw)
        response = c.recv_response()
    assert response.status == 400
    assert b"X-Evil" not in response.raw
    assert all(b"X-Evil" not in r for r in echo.received[before:])
