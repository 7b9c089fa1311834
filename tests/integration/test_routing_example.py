"""The acceptance example of the routing issue, as written: ``portico check`` passes it, and with
its backends moved to free ports it behaves as its comments say."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PorticoFactory
from tests.support.backends import Handler, RawBackend, read_request
from tests.support.ports import free_port
from tests.support.rawhttp import RawConnection, build_request

pytestmark = pytest.mark.timeout(60)

EXAMPLE = (
    """\
[upstreams.api]
backends = ["http://127.0.0.1:5001"]
[upstreams.web]
backends = ["http://127.0.0.1:5002"]
[upstreams.canary]
backends = ["http://127.0.0.1:5003"]

"""
    # One line of the example is longer than this file's lines may be: joined, not changed.
    + "[[routes]]   # GET http://x.example.test/api/users -> api sees /users, with X-Env; "
    + "client sees X-Frame-Options\n"
    + """\
host = "*.example.test"
path = "/api/"
methods = ["GET", "POST"]
strip_prefix = "/api"
upstream = "api"
request_headers = { set = { "X-Env" = "test" }, remove = ["X-Debug"] }
response_headers = { set = { "X-Frame-Options" = "DENY" }, remove = ["X-Powered-By"] }

[[routes]]   # 301 to /new/<rest>, query kept
path_regex = "^/old/(?P<rest>.*)$"
redirect = { to = "/new/{rest}", status = 301 }

[[routes]]   # answered by the gateway itself
path = "/ping"
respond = { status = 200, body = "pong" }

[[routes]]   # header match wins over the catch-all split below
path = "/"
headers = { "X-Canary" = "1" }
upstream = "canary"

[[routes]]   # 90/10 split
path = "/"
split = [{ upstream = "web", weight = 90 }, { upstream = "canary", weight = 10 }]
"""
)

NAMES = {5001: "api", 5002: "web", 5003: "canary"}


def describing(name: str) -> Handler:
    """A backend answering with its name and the request it got, and an X-Powered-By."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            body = json.dumps(
                {"backend": name, "target": request.target, "headers": request.headers}
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nX-Powered-By: PHP/5\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()

    return handler


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[int, RawBackend]]:
    made = {port: RawBackend(describing(name), port=free_port()) for port, name in NAMES.items()}
    try:
        for backend in made.values():
            backend.start()
        yield made
    finally:
        for backend in made.values():
            backend.stop()


def test_the_example_passes_check_as_written(tmp_path: Path) -> None:
    path = tmp_path / "portico.toml"
    path.write_text(EXAMPLE)
    result = subprocess.run(
        [sys.executable, "-m", "portico", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no route is shadowed
    assert result.stdout.splitlines()[0] == f"{path}: ok"


def test_check_warns_about_a_shadowed_route(tmp_path: Path) -> None:
    path = tmp_path / "shadow.toml"
    path.write_text(
        EXAMPLE
        + '\n[[routes]]\npath = "/"\nupstream = "web"\n'  # the split already takes all of "/"
    )
    result = subprocess.run(
        [sys.executable, "-m", "portico", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr  # a warning, not an error
    assert result.stderr.splitlines() == [
        "warning: routes[5]: never matched: routes[4] (*/ -> web 90 / canary 10) comes first "
        "and matches all it does"
    ]


def test_the_example_behaves_as_its_comments_say(
    portico: PorticoFactory, backends: dict[int, RawBackend]
) -> None:
    text = EXAMPLE
    for port, backend in backends.items():
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{backend.port}")
    listen = free_port()
    proc = portico(f'[server]\nlisten = ["127.0.0.1:{listen}"]\nshutdown_grace = 0.5\n\n' + text)
    with RawConnection(proc.port) as conn:
        # GET http://x.example.test/api/users -> api sees /users, with X-Env; client sees
        # X-Frame-Options
        response = conn.request(
            "GET", "/api/users", {"X-Debug": "1", "X-Env": "prod"}, host="x.example.test"
        )
        assert response.status == 200
        seen = response.json()
        assert seen["backend"] == "api" and seen["target"] == "/users"
        sent = [(k.lower(), v) for k, v in seen["headers"]]
        assert [v for k, v in sent if k == "x-env"] == ["test"]
        assert not [v for k, v in sent if k == "x-debug"]
        assert response.header_values("X-Frame-Options") == ["DENY"]
        assert response.header("X-Powered-By") is None
        # Only GET and POST under that host take the api route.
        assert conn.request("POST", "/api/x", host="a.example.test").json()["backend"] == "api"
        assert conn.request("DELETE", "/api/x", host="a.example.test").json()["target"] == (
            "/api/x"
        )
        assert conn.request("GET", "/api/x", host="example.test").json()["target"] == "/api/x"

        # 301 to /new/<rest>, query kept
        response = conn.request("GET", "/old/a/b?x=1&y=2")
        assert response.status == 301
        assert response.header("Location") == "/new/a/b?x=1&y=2"

        # answered by the gateway itself
        before = sum(b.connections for b in backends.values())
        response = conn.request("GET", "/ping")
        assert (response.status, response.body) == (200, b"pong")
        assert sum(b.connections for b in backends.values()) == before

        # header match wins over the catch-all split below
        for _ in range(20):
            assert conn.request("GET", "/x", {"X-Canary": "1"}).json()["backend"] == "canary"

        # 90/10 split
        conn.send(b"".join(build_request("GET", f"/s{i}") for i in range(1000)))
        counts = Counter(conn.recv_response().json()["backend"] for _ in range(1000))
    assert set(counts) == {"web", "canary"}
    assert 80 <= counts["canary"] <= 120, counts
