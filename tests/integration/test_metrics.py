"""Prometheus metrics over real sockets: scrapes of ``GET /metrics`` on the admin listener,
read back with prometheus_client's parser, checked by the real ``promtool``, and compared
with what the clients sent and received. Every load loop is bounded in count and time."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.behaviours import echo_http, respond, slow_headers
from tests.support.ports import free_port
from tests.support.processes import listening_workers
from tests.support.rawhttp import RawConnection
from tests.support.waiting import wait_until

TOKEN = "metrics-test-token"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
ERROR_500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom"


def with_admin(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    port = free_port()
    return {**config, "admin": {"listen": f"127.0.0.1:{port}", "token": TOKEN}}, (
        f"http://127.0.0.1:{port}/metrics"
    )


def scrape(url: str) -> str:
    resp = httpx.get(url, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return resp.text


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def total(found: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in found.items() if n == name and want <= lbl)


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed (Debian package prometheus; scripts/test.sh installs it)"
        )
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not done.stdout + done.stderr, done.stdout + done.stderr  # not even a lint warning


def wait_metric(
    url: str, predicate: Callable[[Samples], bool], message: str, timeout: float = 10
) -> Samples:
    found: Samples = {}

    def check() -> bool:
        nonlocal found
        found = samples(scrape(url))
        return predicate(found)

    wait_until(check, timeout, message=f"{message}; last scrape: {found}")
    return found


# --- counts under load, across workers ------------------------------------------------------

CLIENTS, PER_CLIENT = 4, 60
BODY = b"x" * 100


def test_a_scrape_under_load_with_two_workers_matches_the_clients(
    portico: Any, raw_backend: Any
) -> None:
    a, b = raw_backend(echo_http()), raw_backend(echo_http())
    config, url = with_admin({
        "server": {"shutdown_grace": 0.5},
        "upstreams": {"app": {"backends": [a.url, b.url]}},
        "routes": [
            {"name": "api", "path": "/api/", "upstream": "app"},
            {"name": "limited", "path": "/limited",
             "respond": {"status": 200, "body": "ok"},
             "rate_limit": {"rate": 1, "per": "hour", "burst": 5}},
        ],
    })  # fmt: skip
    proxy = portico(config, workers=2)
    wait_until(lambda: len(listening_workers(proxy.pid, proxy.port)) == 2, 60, message="2 workers")
    plan = [("GET", "/api/x", b""), ("POST", "/api/y", BODY), ("GET", "/limited", b""),
            ("GET", "/nowhere", b"")]  # fmt: skip
    seen: collections.Counter[tuple[str, str, str]] = collections.Counter()
    body_bytes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            deadline = time.monotonic() + 60
            with RawConnection(proxy.port) as conn:
                for i in range(PER_CLIENT):
                    assert time.monotonic() < deadline, "the load ran out of time"
                    method, target, body = plan[i % len(plan)]
                    resp = conn.request(method, target, body=body)
                    route = {"/api/x": "api", "/api/y": "api", "/limited": "limited"}.get(
                        target, ""
                    )
                    with lock:
                        seen[route, method, f"{resp.status // 100}xx"] += 1
                        body_bytes[route] += len(resp.body)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    # Scrape while the load runs: every exposition passes promtool, no count goes back.
    last = 0.0
    scrapes = 0
    while any(t.is_alive() for t in threads) or scrapes < 2:
        text = scrape(url)
        if scrapes < 3:
            promtool_check(text)
        now = total(samples(text), "portico_requests_total")
        assert now >= last, (now, last)
        last = now
        scrapes += 1
    for t in threads:
        t.join(30)
    assert not errors, errors
    sent = CLIENTS * PER_CLIENT
    found = wait_metric(
        url,
        lambda s: total(s, "portico_requests_total") == sent,
        f"{sent} requests counted",
    )
    for (route, method, klass), n in seen.items():
        counted = total(found, "portico_requests_total", route=route, method=method,
                        status_class=klass)  # fmt: skip
        assert counted == n, (route, method, klass, counted, n)
    assert seen["limited", "GET", "4xx"] > 0  # the rate limit did turn requests away
    assert (
        total(found, "portico_refused_requests_total", route="limited", reason="rate_limit")
        == (seen["limited", "GET", "4xx"])
    )
    api = sum(n for (route, _m, _k), n in seen.items() if route == "api")
    endpoints = {
        dict(lbl)["endpoint"]
        for (name, lbl), v in found.items()
        if name == "portico_requests_total" and dict(lbl)["route"] == "api" and v
    }
    assert endpoints == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert total(found, "portico_request_duration_seconds_count", route="api") == api
    assert total(found, "portico_request_duration_seconds_bucket", route="api", le="+Inf") == api
    assert total(found, "portico_upstream_response_seconds_count", upstream="app") == api
    posts = seen["api", "POST", "2xx"]
    assert total(found, "portico_request_body_bytes_total", route="api") == posts * len(BODY)
    for route, n in body_bytes.items():
        assert total(found, "portico_response_body_bytes_total", route=route) == n, route
    promtool_check(scrape(url))


def test_counts_do_not_go_back_when_a_worker_is_killed(portico: Any, raw_backend: Any) -> None:
    backend = raw_backend(echo_http())
    config, url = with_admin({
        "server": {"shutdown_grace": 0.5},
        "upstreams": {"app": {"backends": [backend.url]}},
        "routes": [{"name": "api", "path": "/", "upstream": "app"}],
    })  # fmt: skip
    proxy = portico(config, workers=2)
    wait_until(lambda: len(listening_workers(proxy.pid, proxy.port)) == 2, 60, message="2 workers")

    def send(n: int) -> None:
        for _ in range(n):  # a new connection each: the kernel spreads them over workers
            with RawConnection(proxy.port) as conn:
                assert conn.request("GET", "/").status == 200

    send(100)
    wait_metric(url, lambda s: total(s, "portico_requests_total") == 100, "100 counted")
    victim = listening_workers(proxy.pid, proxy.port)[0]
    os.kill(victim, signal.SIGKILL)
    last = 100.0

    def replaced() -> bool:
        nonlocal last
        now = total(samples(scrape(url)), "portico_requests_total")
        assert now >= last, f"the count went back from {last} to {now}"
        last = now
        workers = listening_workers(proxy.pid, proxy.port)
        return len(workers) == 2 and victim not in workers

    wait_until(replaced, 30, message="the killed worker replaced")
    send(50)
    wait_metric(url, lambda s: total(s, "portico_requests_total") == 150, "150 counted")


# --- one family after another, each from real traffic ----------------------------------------


def test_connection_and_in_flight_gauges(portico: Any, raw_backend: Any) -> None:
    slow = raw_backend(slow_headers(3.0))
    config, url = with_admin({
        "server": {"shutdown_grace": 0.5},
        "upstreams": {"slow": {"backends": [slow.url]}},
        "routes": [{"name": "slow", "path": "/", "upstream": "slow"}],
    })  # fmt: skip
    proxy = portico(config)
    idle = [RawConnection(proxy.port) for _ in range(4)]
    busy = RawConnection(proxy.port)
    try:
        busy.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        label = f"127.0.0.1:{slow.port}"
        wait_metric(
            url,
            lambda s: (
                total(s, "portico_connections_open") == 5
                and total(s, "portico_connections_active") == 1
                and total(s, "portico_endpoint_in_flight", endpoint=label) == 1
            ),
            "5 open connections, 1 active, 1 request in flight",
        )
    finally:
        for conn in [*idle, busy]:
            conn.close()
    wait_metric(url, lambda s: total(s, "portico_connections_open") == 0, "all closed")


def test_retries_ejections_and_health(portico: Any, raw_backend: Any) -> None:
    good, failing = raw_backend(echo_http()), raw_backend(respond(ERROR_500))
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    config, url = with_admin({
        "server": {"shutdown_grace": 0.5},
        "upstreams": {
            "retrying": {"backends": [dead, good.url],
                         "outlier": {"consecutive_failures": 0}},
            "ejecting": {"backends": [failing.url, good.url],
                         "outlier": {"consecutive_failures": 2, "base_ejection": 60}},
            "checked": {"backends": [dead, good.url],
                        "health": {"path": "/", "interval": 0.1, "fall": 1, "rise": 1}},
        },
        "routes": [
            {"name": "retrying", "path": "/r", "upstream": "retrying"},
            {"name": "ejecting", "path": "/e", "upstream": "ejecting"},
            {"name": "checked", "path": "/c", "upstream": "checked"},
        ],
    })  # fmt: skip
    proxy = portico(config)
    with RawConnection(proxy.port) as conn:
        retried = [conn.request("GET", "/r") for _ in range(6)]
        ejected = [conn.request("GET", "/e") for _ in range(8)]
    assert {r.status for r in retried} == {200}  # the dead endpoint's tries went elsewhere
    fails = sum(r.status == 500 for r in ejected)
    assert fails == 2, [r.status for r in ejected]  # two 500s in a row, then ejected
    dead_label = dead.removeprefix("http://")
    found = wait_metric(
        url,
        lambda s: total(s, "portico_endpoint_up", upstream="checked", endpoint=dead_label) == 0,
        "the dead endpoint DOWN",
    )
    # Requests that met the dead endpoint first took a second try (how many depends on the
    # balancer's turn after each retry); every answer came from the good one.
    assert 1 <= total(found, "portico_retries_total", upstream="retrying") <= 6
    assert total(found, "portico_requests_total", route="retrying", endpoint=good.url[7:]) == 6
    failing_label = f"127.0.0.1:{failing.port}"
    assert total(found, "portico_endpoint_ejections_total", endpoint=failing_label) == 1
    assert total(found, "portico_endpoint_ejected", endpoint=failing_label) == 1
    assert total(found, "portico_endpoint_up", upstream="checked", endpoint=good.url[7:]) == 1
    assert total(found, "portico_requests_total", route="ejecting", status_class="5xx") == 2


def test_drain_and_weight_gauges_follow_admin_actions(portico: Any, raw_backend: Any) -> None:
    a, b = raw_backend(echo_http()), raw_backend(echo_http())
    config, url = with_admin({
        "server": {"shutdown_grace": 0.5},
        "upstreams": {"app": {"backends": [a.url, b.url]}},
        "routes": [{"name": "api", "path": "/", "upstream": "app"}],
    })  # fmt: skip
    portico(config, workers=2)
    label = f"127.0.0.1:{a.port}"
    found = samples(scrape(url))
    assert total(found, "portico_endpoint_draining", endpoint=label) == 0
    assert total(found, "portico_endpoint_weight", endpoint=label) == 1
    api = url.removesuffix("/metrics") + f"/api/upstreams/app/endpoints/{label}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(api + "/drain", headers=auth, timeout=10).status_code == 200
    assert (
        httpx.post(api + "/weight", json={"weight": 7}, headers=auth, timeout=10).status_code == 200
    )
    found = wait_metric(
        url,
        lambda s: (
            total(s, "portico_endpoint_draining", endpoint=label) == 1
            and total(s, "portico_endpoint_weight", endpoint=label) == 7
        ),
        "draining and weight 7",
    )
    assert total(found, "portico_endpoint_draining", endpoint=f"127.0.0.1:{b.port}") == 0


def test_circuit_breaker_skips(portico: Any, raw_backend: Any) -> None:
    one, two = raw_backend(slow_headers(1.0)), raw_backend(slow_headers(1.0))
    config, url = with_admin({
        "server": {"shutdown_grace": 0.5},
        "upstreams": {"capped": {"backends": [one.url, two.url], "max_requests": 1}},
        "routes": [{"name": "capped", "path": "/", "upstream": "capped"}],
    })  # fmt: skip
    proxy = portico(config)
    found = samples(scrape(url))
    assert total(found, "portico_circuit_breaker_skips_total") == 0
    with RawConnection(proxy.port) as held, RawConnection(proxy.port) as second:
        held.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_metric(
            url,
            lambda s: total(s, "portico_endpoint_in_flight", upstream="capped") == 1,
            "one endpoint at its cap",
        )
        assert second.request("GET", "/").status == 200  # went past the capped endpoint
        assert held.recv_response().status == 200
    wait_metric(
        url,
        lambda s: (
            total(s, "portico_circuit_breaker_skips_total", upstream="capped") == 1
            and total(s, "portico_requests_total", route="capped") == 2
        ),
        "one breaker skip counted",
    )


def test_app_instances_scale_events_and_restarts(portico: Any) -> None:
    command = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
    app = {
        "command": command,
        "min": 0,
        "max": 1,
        "ready_interval": 0.05,
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        "cold_start_timeout": 15.0,
    }
    config, url = with_admin({
        "server": {"shutdown_grace": 0.5},
        "upstreams": {"web": {"app": app}},
        "routes": [{"name": "web", "path": "/", "upstream": "web"}],
    })  # fmt: skip
    proxy = portico(config)
    found = wait_metric(
        url,
        lambda s: ("portico_app_desired_instances", frozenset({("app", "web")})) in s,
        "app web",
    )
    assert total(found, "portico_app_desired_instances", app="web") == 0
    with RawConnection(proxy.port, timeout=20) as conn:
        assert conn.request("GET", "/").status == 200  # a cold start
    found = wait_metric(
        url,
        lambda s: total(s, "portico_app_instances", app="web", state="ready") == 1,
        "one ready instance",
    )
    assert total(found, "portico_app_scale_events_total", app="web") == 1
    assert total(found, "portico_events_total", source="web", kind="scale") == 1
    assert total(found, "portico_app_desired_instances", app="web") == 1
    assert total(found, "portico_app_actual_instances", app="web") == 1
    servers = [
        p for p in psutil.Process(proxy.pid).children(recursive=True)
        if "http.server" in " ".join(p.cmdline())
    ]  # fmt: skip
    assert len(servers) == 1, servers
    servers[0].kill()  # a crash: the supervisor replaces it
    found = wait_metric(
        url,
        lambda s: (
            total(s, "portico_app_restarts_total", app="web", reason="crash") == 1
            and total(s, "portico_app_instances", app="web", state="ready") == 1
        ),
        "the crash counted and the instance replaced",
        timeout=20,
    )
    promtool_check(scrape(url))
