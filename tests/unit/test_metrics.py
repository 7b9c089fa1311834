"""Metrics without sockets: counting on the finish path, deltas summed, the exposition read
back by prometheus_client's parser and checked by promtool (the real one, if installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from portico.admin.metrics import CONTENT_TYPE, quantile, render, snapshot
from portico.codec.events import RequestHead
from portico.config.model import Config
from portico.dataplane.metrics import BUCKETS, MetricTotals, RequestMetrics, metrics_enabled
from portico.runtime.request import RequestState
from portico.runtime.snapshot import Snapshot, compile_config

CONFIG = {
    "upstreams": {"app": {"backends": ["http://127.0.0.1:5001", "http://127.0.0.1:5002"]}},
    "routes": [{"name": "api", "path": "/", "upstream": "app"}],
}


def request(method: bytes = b"GET") -> RequestState:
    head = RequestHead(
        method,
        b"/x",
        b"1.1",
        [(b"Host", b"example.com")],
        host=b"example.com",
        keep_alive=True,
        framing="none",
        content_length=None,
        connection_tokens=frozenset(),
        expect_continue=False,
        upgrade=False,
    )
    return RequestState(head, b"/x", b"example.com", "192.0.2.7", False, b"http", 0.0)


def finished(
    snap: Snapshot,
    status: int,
    endpoint: str = "127.0.0.1:5001",
    method: bytes = b"GET",
    **fields: Any,
) -> RequestState:
    req = request(method)
    req.route = snap.router.routes[0]
    req.status = status
    req.service = "app"
    req.upstream = endpoint
    req.tries = 1
    req.upstream_time = 0.002
    req.sent_bytes = 10
    for name, value in fields.items():
        setattr(req, name, value)
    return req


class Source:
    """A MetricsSource over plain values: what the Gateway gives render()."""

    def __init__(self, snap: Snapshot, totals: MetricTotals) -> None:
        self.snap = snap
        self.totals = totals

    def metric_totals(self) -> MetricTotals:
        return self.totals

    def snapshot(self) -> Snapshot:
        return self.snap

    def orchestrator(self) -> None:
        return None


@pytest.fixture
def snap() -> Snapshot:
    return compile_config(Config.model_validate(CONFIG))


def parsed(body: bytes) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample_name} {labels}")


def test_enabled_with_the_admin_section_only() -> None:
    assert not metrics_enabled(SimpleNamespace(admin=None))
    assert metrics_enabled(SimpleNamespace(admin=SimpleNamespace(metrics=True)))
    assert not metrics_enabled(SimpleNamespace(admin=SimpleNamespace(metrics=False)))


def test_deltas_add_up_and_buckets_follow_le(snap: Snapshot) -> None:
    metrics, totals = RequestMetrics(), MetricTotals()
    metrics.count(finished(snap, 200), 0.001)  # exactly on a bound: counted in le="0.001"
    metrics.count(finished(snap, 503), 0.0011)
    totals.add(metrics.take(snap))
    metrics.count(finished(snap, 200, method=b"BREW"), 100.0)  # beyond every bound: +Inf
    metrics.count(finished(snap, 429, refused="rate_limit", tries=0), 0.0)
    metrics.count(finished(snap, 200, tries=3), 0.2)
    totals.add(metrics.take(snap))
    assert metrics.take(snap)["requests"] == {}  # taken: starts afresh
    assert sum(totals.requests.values()) == 5
    route = snap.router.routes[0].name
    key = (route, "app", "127.0.0.1:5001", "GET", "2xx")
    assert totals.requests[key] == 2
    assert totals.requests[(route, "app", "127.0.0.1:5001", "other", "2xx")] == 1
    hist = totals.durations[(route, "app")]
    assert hist[0] == 2 and hist[1] == 1 and hist[len(BUCKETS)] == 1  # 0.0, 0.001 | 0.0011
    assert hist[-1] == pytest.approx(0.001 + 0.0011 + 100.0 + 0.2)
    assert totals.retries == {"app": 2}
    assert totals.refused == {(route, "rate_limit"): 1}
    assert totals.bytes[route] == [0, 50]


def test_service_events_are_drained_into_the_report(snap: Snapshot) -> None:
    metrics, totals = RequestMetrics(), MetricTotals()
    service = snap.services["app"]
    service.breaker_skips = 3
    service.ejections["127.0.0.1:5002"] = 1
    totals.add(metrics.take(snap))
    assert service.breaker_skips == 0 and not service.ejections
    assert totals.events == {
        ("breaker_skip", "app", ""): 3,
        ("ejection", "app", "127.0.0.1:5002"): 1,
    }


def test_gauges_of_a_gone_worker_leave_its_counters_stay(snap: Snapshot) -> None:
    totals = MetricTotals()
    for worker in (1, 2):
        metrics = RequestMetrics()
        metrics.count(finished(snap, 200), 0.01)
        totals.add(metrics.take(snap))
        totals.set_gauges(worker, {"open": 2, "active": 1, "endpoints": {("app", "a"): (1, 1)}})
    assert totals.connections() == (4, 2)
    assert totals.endpoint_gauges() == {("app", "a"): (2, 2)}
    totals.drop_worker(1)
    assert totals.connections() == (2, 1)
    assert sum(totals.requests.values()) == 2


def test_quantile_interpolates_like_histogram_quantile() -> None:
    hist = [0.0] * (len(BUCKETS) + 2)
    assert quantile(0.5, hist) is None
    hist[BUCKETS.index(0.1)] = 10  # ten values in (0.05, 0.1]
    assert quantile(0.5, hist) == pytest.approx(0.075)
    hist[len(BUCKETS)] = 90  # and ninety beyond the last bound
    assert quantile(0.99, hist) == BUCKETS[-1]


def test_render_reads_back_and_matches(snap: Snapshot) -> None:
    metrics, totals = RequestMetrics(), MetricTotals()
    for status in (200, 200, 502):
        metrics.count(finished(snap, status), 0.02)
    metrics.count(finished(snap, 200, endpoint='odd"name\\x'), 0.02)  # escaped labels
    totals.add(metrics.take(snap))
    totals.set_gauges(1, {"open": 3, "active": 1, "endpoints": {("app", "127.0.0.1:5001"): (1, 0)}})
    body = render(Source(snap, totals))
    families = parsed(body)
    assert (
        value(families, "portico_requests_total", status_class="2xx", endpoint="127.0.0.1:5001")
        == 2
    )
    assert value(families, "portico_requests_total", status_class="5xx") == 1
    assert value(families, "portico_requests_total", endpoint='odd"name\\x') == 1
    assert value(families, "portico_request_duration_seconds_count", upstream="app") == 4
    assert value(families, "portico_request_duration_seconds_bucket", le="0.025") == 4
    assert value(families, "portico_request_duration_seconds_bucket", le="0.01") == 0
    assert (
        value(families, "portico_upstream_response_seconds_count", endpoint="127.0.0.1:5001") == 3
    )
    assert value(families, "portico_response_body_bytes_total") == 40
    assert value(families, "portico_connections_open") == 3
    assert value(families, "portico_endpoint_in_flight", endpoint="127.0.0.1:5001") == 1
    assert value(families, "portico_endpoint_up", endpoint="127.0.0.1:5002") == 1
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    data = snapshot(Source(snap, totals))
    (up,) = data["upstreams"]
    assert (up["upstream"], up["requests"], up["errors"]) == ("app", 4, 1)
    assert up["latency"]["count"] == 4 and up["p50"] == pytest.approx(0.0175)
    assert data["connections"] == {"open": 3, "active": 1}


def test_promtool_accepts_the_exposition(snap: Snapshot) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed (Debian package prometheus; scripts/test.sh installs it)"
        )
    metrics, totals = RequestMetrics(), MetricTotals()
    metrics.count(finished(snap, 200), 0.02)
    totals.add(metrics.take(snap))
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=render(Source(snap, totals)),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == b"", done.stdout + done.stderr  # not even a lint warning


# --- the documentation ----------------------------------------------------------------------

DOCS = Path(__file__).parents[2] / "docs" / "operations.md"


def test_every_family_is_documented() -> None:
    source = (Path(__file__).parents[2] / "src/portico/admin/metrics.py").read_text()
    families = set(re.findall(r'"(portico_[a-z_]+)"', source))
    documented = set(re.findall(r"^\| `(portico_[a-z_]+)` \|", DOCS.read_text(), re.M))
    assert len(families) >= 20  # the regex finds them (a guard against a silent miss)
    assert families == documented, (families - documented, documented - families)


def test_the_documented_scrape_config_and_alerts_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed (Debian package prometheus; scripts/test.sh installs it)"
        )
    text = DOCS.read_text()
    for name, command in (("prometheus.yml", "config"), ("portico-alerts.yml", "rules")):
        match = re.search(rf"```yaml\n# {re.escape(name)}\n(.*?)```", text, re.S)
        assert match is not None, name
        path = tmp_path / name
        path.write_text(match.group(1))
        done = subprocess.run(
            [promtool, "check", command, str(path)], capture_output=True, timeout=30
        )
        assert done.returncode == 0, done.stdout + done.stderr
