"""The admin listener over real sockets: every read route, every action, the token rules and
the bad inputs the issue lists, with one process and with two workers (the listener then runs
in the master, and actions reach the workers over the bus)."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.admin import TOKEN, AdminClient, with_admin
from tests.support.fleet import app_config, fleet, request, served_by, spread
from tests.support.ports import free_port
from tests.support.waiting import wait_until

# The issue's acceptance example, verbatim.
ISSUE_EXAMPLE = (Path(__file__).parents[2] / "examples" / "admin.toml").read_text()


def portico_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portico", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_issue_example_passes_check_and_behaves_as_commented(
    tmp_path: Path, portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    path = tmp_path / "portico.toml"
    path.write_text(ISSUE_EXAMPLE)
    assert portico_check(path).returncode == 0, portico_check(path).stdout
    # The same file, on free ports and real backends.
    a, b = fleet(raw_backend, "a", "b")
    admin_port, listen = free_port(), free_port()
    text = (
        ISSUE_EXAMPLE.replace("127.0.0.1:9901", f"127.0.0.1:{admin_port}")
        .replace("http://127.0.0.1:5001", a.url)
        .replace("http://127.0.0.1:5002", b.url)
        .replace("workers = 2", f'workers = 2\nlisten = "127.0.0.1:{listen}"\nshutdown_grace = 1')
    )
    proxy = portico(text)
    client = AdminClient({"admin": {"listen": f"127.0.0.1:{admin_port}"}}, token="change-me")
    assert set(spread(proxy.port, 10)) == {"a", "b"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>Portico admin</title>" in page.text
    metrics = wait_until(
        lambda: (r := client.get("/metrics")).text.count("portico_requests_total{") >= 2 and r,
        10,
        message="requests counted in /metrics",
    )
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert client.json("/api/status")["workers"] == 2
    drain = f"/api/upstreams/app/endpoints/{a.label}/drain"
    assert client.post(drain, token=None).status_code == 401
    assert client.endpoint("app", a.label)["draining"] is False
    assert client.post(drain).status_code == 200
    assert client.endpoint("app", a.label)["draining"] is True


def test_check_refuses_public_admin_without_token(tmp_path: Path) -> None:
    path = tmp_path / "portico.toml"
    path.write_text(
        ISSUE_EXAMPLE.replace("127.0.0.1:9901", "0.0.0.0:9901").replace('token = "change-me"', "")
    )
    result = portico_check(path)
    assert result.returncode == 1
    assert result.stdout.startswith("admin.token: the admin listener on 0.0.0.0:9901 is not")
    # With a token it passes; on loopback without one too (actions are then off on TCP).
    path.write_text(ISSUE_EXAMPLE.replace("127.0.0.1:9901", "0.0.0.0:9901"))
    assert portico_check(path).returncode == 0
    path.write_text(ISSUE_EXAMPLE.replace('token = "change-me"', ""))
    assert portico_check(path).returncode == 0


@pytest.fixture
def two(raw_backend: RawBackendFactory) -> list[Any]:
    return fleet(raw_backend, "a", "b")


@pytest.mark.parametrize("workers", [1, 2])
def test_every_read_route(two: list[Any], portico: PorticoFactory, workers: int) -> None:
    a, b = two
    config = with_admin(app_config([a.url, b.url]))
    proxy = portico(config, workers=workers)
    client = AdminClient(config)
    assert set(spread(proxy.port, 6)) == {"a", "b"}
    status = client.json("/api/status")
    assert status["workers"] == workers and len(status["worker_pids"]) == (
        workers if workers > 1 else 0
    )
    effective = client.json("/api/config")
    assert effective["admin"]["token"] == "<redacted>"
    assert effective["upstreams"]["app"]["backends"][0]["url"] == a.url
    routes = client.json("/api/routes")
    assert routes[0]["upstreams"] == ["app"]
    ups = client.json("/api/upstreams")
    assert [u["name"] for u in ups] == ["app"]
    # Request counts come from every worker (summed over the bus with two).
    wait_until(
        lambda: sum(e["requests"] for e in client.json("/api/upstreams/app")["endpoints"]) >= 6,
        10,
        message="the master to know the workers' request counts",
    )
    assert client.json("/api/apps") == []
    assert client.get("/api/apps/app").status_code == 404
    assert client.get("/api/upstreams/nope").json() == {"error": "no upstream named 'nope'"}
    assert isinstance(client.json("/api/events?limit=5"), list)
    assert client.get("/api/events?limit=0").status_code == 400
    assert client.json("/api/openapi.json")["openapi"] == "3.0.3"
    assert client.get("/static/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/../gateway.py").status_code == 404
    assert client.get("/nope").status_code == 404
    assert client.post("/api/status").status_code == 405
    with httpx.stream("GET", client.base + "/api/stream", timeout=10) as stream:
        assert stream.headers["content-type"] == "text/event-stream"
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("event:")) == "event: tick"


@pytest.mark.parametrize("workers", [1, 2])
def test_drain_undrain_and_weight_reach_every_worker(
    two: list[Any], portico: PorticoFactory, workers: int
) -> None:
    a, b = two
    config = with_admin(app_config([a.url, b.url], balancer="weighted_round_robin"))
    proxy = portico(config, workers=workers)
    client = AdminClient(config)
    base = "/api/upstreams/app/endpoints/"
    answer = client.post(base + a.label + "/drain")
    assert answer.status_code == 200 and answer.json()["draining"] is True
    # Fresh connections land on any worker: none of 30 may reach the drained endpoint.
    wait_until(lambda: spread(proxy.port, 4) == {"b": 4}, 5, message="a drained everywhere")
    assert spread(proxy.port, 30) == {"b": 30}
    assert client.endpoint("app", a.label)["state"] == "draining"
    assert client.post(base + a.label + "/undrain").status_code == 200
    wait_until(lambda: "a" in spread(proxy.port, 6), 5, message="a back in rotation")
    # Weight 9 against 1: a takes about 90% (smooth weighted round robin per worker).
    assert client.post(base + a.label + "/weight", {"weight": 9}).json()["weight"] == 9
    wait_until(lambda: spread(proxy.port, 20)["a"] >= 16, 5, message="a's weight in effect")
    counts = spread(proxy.port, 100)
    assert counts["a"] >= 80, counts
    for bad in ({"weight": 0}, {"weight": 1001}, {"weight": "2"}, {}):
        answer = client.post(base + a.label + "/weight", bad)
        assert answer.status_code == 400 and "weight" in answer.json()["error"]
    assert client.post(base + a.label + "/weight", "not json").status_code == 400
    assert client.endpoint("app", a.label)["weight"] == 9
    events = client.json("/api/events")
    messages = [e["message"] for e in events if e["kind"] == "admin"]
    assert messages == [
        f"admin: drain app/{a.label}",
        f"admin: undrain app/{a.label}",
        f"admin: weight of app/{a.label} 1 -> 9",
    ]
    assert f"admin action by admin: drain app/{a.label}" in proxy.output()


def test_actions_without_a_valid_token_change_nothing(
    two: list[Any], portico: PorticoFactory, tmp_path: Path
) -> None:
    a, b = two
    sock = str(tmp_path / "admin.sock")
    config = with_admin(
        app_config([a.url, b.url]), token=None, tokens={"alice": "alice-secret-1"},
        unix_socket=sock,
    )  # fmt: skip
    proxy = portico(config)
    client = AdminClient(config, token="alice-secret-1")
    drain = f"/api/upstreams/app/endpoints/{a.label}/drain"
    for token in (None, "wrong-token", "alice-secret-2", TOKEN):
        answer = client.post(drain, token=token)
        assert answer.status_code == 401, token
        assert answer.headers["www-authenticate"].startswith("Bearer")
    for path, body in (
        (f"/api/upstreams/app/endpoints/{a.label}/weight", {"weight": 5}),
        ("/api/apps/app/scale", {"count": 2}),
        ("/api/apps/app/restart", None),
        ("/api/reload", None),
    ):
        assert client.post(path, body, token=None).status_code == 401
    assert client.endpoint("app", a.label) | {"requests": 0} == client.endpoint("app", a.label) | {
        "requests": 0
    }
    assert client.endpoint("app", a.label)["draining"] is False
    assert client.endpoint("app", a.label)["weight"] == 1
    assert "admin action" not in proxy.output()
    # A named token: the log says who.
    assert client.post(drain).status_code == 200
    assert f"admin action by alice: drain app/{a.label}" in proxy.output()
    # The Unix socket needs no token (its file mode is the guard) and is logged as such.
    transport = httpx.HTTPTransport(uds=sock)
    with httpx.Client(transport=transport, base_url="http://admin") as unix:
        answer = unix.post(f"/api/upstreams/app/endpoints/{a.label}/undrain")
        assert answer.status_code == 200
        assert unix.get("/api/status").json()["upstreams"] == 1
    assert f"admin action by unix: undrain app/{a.label}" in proxy.output()
    assert oct(Path(sock).stat().st_mode & 0o777) == "0o600"


def test_no_token_configured_means_no_actions_over_tcp(
    two: list[Any], portico: PorticoFactory
) -> None:
    a, b = two
    config = with_admin(app_config([a.url, b.url]), token=None)
    portico(config)
    client = AdminClient(config, token=None)
    answer = client.post(f"/api/upstreams/app/endpoints/{a.label}/drain")
    assert answer.status_code == 401
    assert "no admin token is configured" in answer.json()["error"]
    assert client.json("/api/upstreams/app")["endpoints"][0]["draining"] is False


def test_reads_can_require_the_token(two: list[Any], portico: PorticoFactory) -> None:
    a, b = two
    config = with_admin(app_config([a.url, b.url]), read="token")
    portico(config)
    client = AdminClient(config)
    assert client.get("/api/upstreams").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get("/api/upstreams", token=TOKEN).status_code == 200
    # The page, its files and the API document hold no data: the page asks for the token.
    assert client.get("/").status_code == 200
    assert client.get("/static/dashboard.js").status_code == 200
    assert client.get("/api/openapi.json").status_code == 200
    assert client.get("/api/stream").status_code == 401


def test_unknown_upstream_endpoint_or_app_is_404(two: list[Any], portico: PorticoFactory) -> None:
    a, b = two
    config = with_admin(app_config([a.url, b.url]))
    portico(config)
    client = AdminClient(config)
    cases = {
        "/api/upstreams/nope/endpoints/127.0.0.1:1/drain": "no upstream named 'nope'",
        "/api/upstreams/app/endpoints/127.0.0.1:1/undrain": "has no endpoint '127.0.0.1:1'",
        "/api/apps/nope/scale": "no app named 'nope'",
        "/api/apps/nope/restart": "no app named 'nope'",
    }
    for path, reason in cases.items():
        answer = client.post(path, {"count": 1} if "scale" in path else None)
        assert answer.status_code == 404, path
        assert reason in answer.json()["error"]
    assert client.post("/api/nope").status_code == 404


def _config_text(backends: list[str], admin_port: int, listen: int, weight: int = 1) -> str:
    rows = ", ".join(f'{{ url = "{u}", weight = {weight} }}' for u in backends)
    return (
        f'[server]\nlisten = "127.0.0.1:{listen}"\nshutdown_grace = 1\n\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\ntoken = "{TOKEN}"\n\n'
        f"[upstreams.app]\nbackends = [{rows}]\n"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_posted_or_from_file(two: list[Any], portico: PorticoFactory, workers: int) -> None:
    a, b = two
    admin_port, listen = free_port(), free_port()
    proxy = portico(_config_text([a.url, b.url], admin_port, listen), workers=workers)
    client = AdminClient({"admin": {"listen": f"127.0.0.1:{admin_port}"}})
    before = client.json("/api/config")
    # Two problems: both reported by key path, nothing changes.
    bad = _config_text([a.url], admin_port, listen).replace(
        "[upstreams.app]", '[upstreams.app]\nbalancer = "nope"\nretry = { attempts = 0 }'
    )
    answer = client.post("/api/reload", bad)
    assert answer.status_code == 400
    problems = {p["path"] for p in answer.json()["problems"]}
    assert problems == {"upstreams.app.balancer", "upstreams.app.retry.attempts"}
    assert client.json("/api/config") == before
    assert client.post("/api/reload", "[server\n").json()["problems"][0]["path"] == "body"
    # A dry run shows the diff and changes nothing.
    good = _config_text([b.url], admin_port, listen)
    answer = client.post("/api/reload?dry_run=1", good)
    assert answer.status_code == 200 and answer.json()["applied"] is False
    assert {"path": "upstreams.app.backends[1].url", "old": b.url, "new": None} in (
        answer.json()["diff"]
    )
    assert client.json("/api/config") == before
    # Applied: only b serves, on every worker.
    answer = client.post("/api/reload", good)
    assert answer.status_code == 200 and answer.json()["applied"] is True
    assert answer.json()["changed"] == ["upstreams"]
    wait_until(lambda: spread(proxy.port, 6) == {"b": 6}, 10, message="reload on every worker")
    # From the file (empty body): the file still names both.
    answer = client.post("/api/reload")
    assert answer.status_code == 200, answer.text
    assert answer.json()["diff"][0]["path"] == "upstreams.app.backends[0].url"
    wait_until(lambda: set(spread(proxy.port, 10)) == {"a", "b"}, 10, message="file reloaded")
    reloads = [e for e in client.json("/api/events") if e["kind"] in ("admin", "reload")]
    assert [e["kind"] for e in reloads] == ["reload", "admin", "reload", "admin"]


def test_status_providers_and_served_only_on_admin_port(
    two: list[Any], portico: PorticoFactory
) -> None:
    a, b = two
    config = with_admin(app_config([a.url, b.url]))
    proxy = portico(config)
    client = AdminClient(config)
    assert client.json("/api/status")["providers"] == {}
    # The traffic listener knows nothing of the admin routes: they go to the backend.
    assert served_by(request(proxy.port, "GET", "/api/status")) in ("a", "b")


def test_counts_by_endpoint_under_load(two: list[Any], portico: PorticoFactory) -> None:
    a, b = two
    config = with_admin(app_config([a.url, b.url]))
    proxy = portico(config, workers=2)
    client = AdminClient(config)
    sent: collections.Counter[str] = spread(proxy.port, 40)
    wait_until(
        lambda: (
            {e["endpoint"]: e["requests"] for e in client.json("/api/upstreams/app")["endpoints"]}
            == {a.label: sent["a"], b.label: sent["b"]}
        ),
        10,
        message="the master's per-endpoint counts to match what was sent",
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_busy_admin_port_refuses_to_start(tmp_path: Path, workers: int) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = tmp_path / "portico.toml"
        path.write_text(
            ISSUE_EXAMPLE.replace("127.0.0.1:9901", f"127.0.0.1:{port}").replace(
                "workers = 2", f'workers = {workers}\nlisten = "127.0.0.1:{free_port()}"'
            )
        )
        result = subprocess.run(
            [sys.executable, "-m", "portico", "serve", "-c", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2
        assert result.stderr.strip().endswith(
            f"portico: cannot start: admin.listen 127.0.0.1:{port}: error while attempting to"
            f" bind on address ('127.0.0.1', {port}): address already in use"
        ), result.stderr
        assert "Traceback" not in result.stderr
        strict = subprocess.run(
            [sys.executable, "-m", "portico", "check", "--strict", str(path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert strict.returncode == 1
        assert strict.stdout.startswith(f"admin.listen: cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("workers", [1, 2])
def test_ejections_show_in_upstreams_and_events(
    two: list[Any], portico: PorticoFactory, workers: int
) -> None:
    a, b = two
    config = with_admin(
        app_config(
            [a.url, b.url],
            outlier={"consecutive_failures": 2, "base_ejection": 2.0},
            retry={"attempts": 1},
        )
    )
    proxy = portico(config, workers=workers)
    client = AdminClient(config)
    a.board.status = 500
    # Fresh connections spread over the workers; each ejects a after two of its own 500s.
    wait_until(
        lambda: spread_statuses(proxy.port, 6) and client.endpoint("app", a.label)["ejected"],
        10,
        message="a ejected",
    )
    row = client.endpoint("app", a.label)
    assert row["state"] == "ejected" and row["ejected_by"] >= 1
    assert client.endpoint("app", b.label)["ejected"] is False
    wait_until(
        lambda: any(
            e["kind"] == "ejection" and e["message"].startswith(f"{a.label} ejected")
            for e in client.json("/api/events")
        ),
        5,
        message="an ejection event",
    )
    a.board.status = 200
    wait_until(
        lambda: any(
            e["message"] == f"{a.label} back after ejection" for e in client.json("/api/events")
        ),
        15,
        message="the end of the ejection in the events",
    )


def spread_statuses(port: int, n: int) -> bool:
    for _ in range(n):
        request(port)
    return True


def test_live_streams_are_bounded_and_released(two: list[Any], portico: PorticoFactory) -> None:
    import socket

    from portico.admin.dashboard import MAX_STREAMS

    a, b = two
    config = with_admin(app_config([a.url, b.url]))
    portico(config)
    client = AdminClient(config)
    host, port = config["admin"]["listen"].split(":")

    def open_stream(method: str = "GET") -> tuple[socket.socket, bytes]:
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(f"{method} /api/stream HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return sock, sock.recv(200)

    for _ in range(MAX_STREAMS + 5):  # HEAD sends no stream and holds no place
        sock, head = open_stream("HEAD")
        assert head.startswith(b"HTTP/1.1 200 ")
        sock.close()
    streams = [open_stream() for _ in range(MAX_STREAMS)]
    try:
        assert all(head.startswith(b"HTTP/1.1 200 ") for _, head in streams)
        assert client.get("/api/stream").status_code == 503
        streams.pop()[0].close()  # noticed at its next tick (a second at most)

        def one_more() -> bool:
            sock, head = open_stream()
            streams.append((sock, head))
            return head.startswith(b"HTTP/1.1 200 ")

        wait_until(one_more, 5, interval=0.2, message="the closed stream's place freed")
    finally:
        for sock, _ in streams:
            sock.close()


def test_the_admin_server_refuses_malformed_requests(
    two: list[Any], portico: PorticoFactory
) -> None:
    import socket

    a, b = two
    config = with_admin(app_config([a.url, b.url]))
    portico(config)
    AdminClient(config)  # waits for the port
    host, port = config["admin"]["listen"].split(":")

    def exchange(raw: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(raw)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    assert exchange(b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert exchange(b"GET relative HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert exchange(b"GET / HTTP/1.1\r\nX: " + b"x" * 20000 + b"\r\n\r\n").startswith(
        b"HTTP/1.1 431 "
    )
    chunked = b"POST /api/reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert exchange(chunked).startswith(b"HTTP/1.1 411 ")
    huge = b"POST /api/reload HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
    assert exchange(huge).startswith(b"HTTP/1.1 413 ")
    # Keep-alive: two requests on one connection, the second closing it; HEAD has no body.
    both = exchange(
        b"GET /api/status HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /api/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert both.count(b"HTTP/1.1 200 OK") == 2
    assert both.rstrip().endswith(b"Connection: close\r\nCache-Control: no-store\r\n"
                                  b"X-Content-Type-Options: nosniff")  # fmt: skip
