"""The Prometheus text exposition of a gateway (``GET /metrics``), and the same numbers as
plain data for the admin API and the dashboard (``snapshot``).

Everything here runs at scrape time, in the process that serves the admin listener (the
master when there are workers): it reads the counters the workers reported
(``dataplane.metrics.MetricTotals``), the master's snapshot (endpoint health, weights) and the
supervisors (app instances). Nothing is counted here. The exposition is written by hand:
the format is a few lines of text (version 0.0.4), and a registry of client objects would
be a second copy of counters the finish path already keeps.

Names follow the Prometheus conventions: ``portico_`` prefix, base units (seconds, bytes),
``_total`` on counters. Another part of Portico may add families (TLS handshakes,
certificate expiry) by giving its source an ``extra_families()`` method returning
``Family`` objects.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from portico.dataplane.metrics import BUCKETS, MetricTotals

if TYPE_CHECKING:
    from portico.control.orchestrator import Orchestrator
    from portico.runtime.snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsSource(Protocol):
    """What rendering reads; ``gateway.Gateway`` implements it."""

    def metric_totals(self) -> MetricTotals: ...
    def snapshot(self) -> Snapshot: ...
    def orchestrator(self) -> Orchestrator | None: ...


Labels = Sequence[tuple[str, str]]


@dataclass(slots=True)
class Family:
    """One metric family: ``kind`` is "counter" or "gauge"; samples are (labels, value)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _family_lines(family: Family) -> list[str]:
    out = [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.kind}"]
    out += [f"{family.name}{_labels(lbl)} {_number(v)}" for lbl, v in family.samples]
    return out


def _histogram_lines(
    name: str, help_: str, label_names: tuple[str, ...], hists: dict[Any, list[float]]
) -> list[str]:
    out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    for key in sorted(hists):
        h = hists[key]
        base = list(zip(label_names, key, strict=True))
        cumulative = 0
        for le, n in zip((*BUCKETS, None), h[:-1], strict=True):
            cumulative += int(n)
            bound = "+Inf" if le is None else repr(le)
            out.append(f"{name}_bucket{_labels([*base, ('le', bound)])} {cumulative}")
        out.append(f"{name}_sum{_labels(base)} {float(h[-1])!r}")
        out.append(f"{name}_count{_labels(base)} {cumulative}")
    return out


def _counter(name: str, help_: str, names: tuple[str, ...], data: dict[Any, int]) -> Family:
    samples: list[tuple[Labels, float]] = []
    for key in sorted(data):
        values = key if isinstance(key, tuple) else (key,)
        samples.append((list(zip(names, values, strict=True)), data[key]))
    return Family(name, "counter", help_, samples)


def families(source: MetricsSource) -> tuple[list[Family], MetricTotals]:
    """Every family but the histograms (rendered from the totals directly)."""
    totals = source.metric_totals()
    out = [
        _counter(
            "portico_requests_total",
            "Requests finished, by route, upstream, endpoint, method and status class.",
            ("route", "upstream", "endpoint", "method", "status_class"),
            totals.requests,
        ),
        _counter(
            "portico_request_body_bytes_total",
            "Request body bytes read from clients, by route.",
            ("route",),
            {k: v[0] for k, v in totals.bytes.items()},
        ),
        _counter(
            "portico_response_body_bytes_total",
            "Response body bytes sent to clients, by route.",
            ("route",),
            {k: v[1] for k, v in totals.bytes.items()},
        ),
        _counter(
            "portico_retries_total",
            "Tries beyond the first made for requests, by upstream.",
            ("upstream",),
            totals.retries,
        ),
        _counter(
            "portico_refused_requests_total",
            "Requests a traffic rule answered itself, by route and reason "
            "(rate_limit, rate_limit_unavailable, concurrency, shed, ip_rule).",
            ("route", "reason"),
            totals.refused,
        ),
        _counter(
            "portico_endpoint_ejections_total",
            "Passive outlier ejections of an endpoint (summed over workers).",
            ("upstream", "endpoint"),
            {k[1:]: v for k, v in totals.events.items() if k[0] == "ejection"},
        ),
        _counter(
            "portico_circuit_breaker_skips_total",
            "Endpoint selections that passed over an endpoint at its max_requests cap.",
            ("upstream",),
            {k[1]: v for k, v in totals.events.items() if k[0] == "breaker_skip"},
        ),
    ]
    open_, active = totals.connections()
    out.append(
        Family("portico_connections_open", "gauge", "Client connections open.", [([], open_)])
    )
    out.append(
        Family(
            "portico_connections_active",
            "gauge",
            "Client connections with a request in progress.",
            [([], active)],
        )
    )
    out += _endpoint_families(source.snapshot(), totals)
    orchestrator = source.orchestrator()
    if orchestrator is not None:
        out += _app_families(orchestrator)
    extra = getattr(source, "extra_families", None)
    if extra is not None:
        out += list(extra())
    return out, totals


def _endpoint_families(snapshot: Snapshot, totals: MetricTotals) -> list[Family]:
    worker = totals.endpoint_gauges()
    up = Family("portico_endpoint_up", "gauge", "1 if the endpoint passes its health checks.")
    ejected = Family(
        "portico_endpoint_ejected", "gauge", "Workers that currently eject the endpoint."
    )
    draining = Family("portico_endpoint_draining", "gauge", "1 while the endpoint drains.")
    weight = Family("portico_endpoint_weight", "gauge", "The endpoint's balancing weight.")
    in_flight = Family("portico_endpoint_in_flight", "gauge", "Requests in flight to the endpoint.")
    for name in sorted(snapshot.services):
        for ep in snapshot.services[name].endpoints:
            labels = [("upstream", name), ("endpoint", ep.label)]
            f, e = worker.get((name, ep.label), (0, 0))
            up.samples.append((labels, int(ep.up)))
            ejected.samples.append((labels, e))
            draining.samples.append((labels, int(ep.draining)))
            weight.samples.append((labels, ep.weight))
            in_flight.samples.append((labels, f))
    return [up, ejected, draining, weight, in_flight]


def _app_families(orchestrator: Orchestrator) -> list[Family]:
    instances = Family("portico_app_instances", "gauge", "App instances by state.")
    desired = Family("portico_app_desired_instances", "gauge", "Instances the app should have.")
    actual = Family(
        "portico_app_actual_instances", "gauge", "Instances starting or ready (counted)."
    )
    looping = Family("portico_app_crash_looping", "gauge", "1 while the app crash-loops.")
    for name in sorted(orchestrator.supervisors):
        sup = orchestrator.supervisors[name]
        by_state = {"starting": 0, "ready": 0, "draining": 0, "stopping": 0}
        for managed in sup.instances:
            by_state[managed.state.value] = by_state.get(managed.state.value, 0) + 1
        for state, n in by_state.items():
            instances.samples.append(([("app", name), ("state", state)], n))
        desired.samples.append(([("app", name)], sup.desired))
        actual.samples.append(([("app", name)], by_state["starting"] + by_state["ready"]))
        looping.samples.append(([("app", name)], int(sup.crash_loop)))
    counts = orchestrator.events.counts
    apps = set(orchestrator.supervisors)
    restarts = _counter(
        "portico_app_restarts_total",
        "Instances replaced: after a crash, or by a rolling restart.",
        ("app", "reason"),
        {
            (src, "crash" if kind == "crash" else "rolling"): n
            for (src, kind), n in counts.items()
            if kind in ("crash", "restart") and src in apps
        },
    )
    scale = _counter(
        "portico_app_scale_events_total",
        "Scaling decisions (autoscaler, cold start, admin).",
        ("app",),
        {src: n for (src, kind), n in counts.items() if kind == "scale"},
    )
    events = _counter(
        "portico_events_total",
        "Control-plane events by source and kind (see the event log).",
        ("source", "kind"),
        dict(counts),
    )
    return [instances, desired, actual, looping, restarts, scale, events]


def render(source: MetricsSource) -> bytes:
    """The whole exposition, text format 0.0.4 (serve with ``CONTENT_TYPE``)."""
    fams, totals = families(source)
    lines: list[str] = []
    for family in fams:
        lines += _family_lines(family)
    lines += _histogram_lines(
        "portico_request_duration_seconds",
        "Time from the request head to the end of the response, by route and upstream.",
        ("route", "upstream"),
        totals.durations,
    )
    lines += _histogram_lines(
        "portico_upstream_response_seconds",
        "Time from sending the request upstream to the response head, last try.",
        ("upstream", "endpoint"),
        totals.upstream_durations,
    )
    return ("\n".join(lines) + "\n").encode("utf-8")


# --- plain data for the API and the dashboard ---------------------------------------------


def quantile(q: float, hist: Sequence[float]) -> float | None:
    """The ``q`` quantile of a histogram list (as PromQL's histogram_quantile: linear within
    the bucket). None without observations; the top finite bound when it lies beyond."""
    total = sum(hist[:-1])
    if total == 0:
        return None
    rank = q * total
    seen = 0.0
    lower = 0.0
    for upper, n in zip(BUCKETS, hist, strict=False):
        if seen + n >= rank and n > 0:
            return lower + (upper - lower) * (rank - seen) / n
        seen += n
        lower = upper
    return BUCKETS[-1]


def _latency(hist: Sequence[float]) -> dict[str, Any]:
    cumulative: list[int] = []
    running = 0
    for n in hist[:-1]:
        running += int(n)
        cumulative.append(running)
    return {"buckets": list(BUCKETS), "counts": cumulative, "sum": hist[-1], "count": running}


def _merge(hists: Iterable[Sequence[float]]) -> list[float]:
    out = [0.0] * (len(BUCKETS) + 2)
    for h in hists:
        for i, v in enumerate(h):
            out[i] += v
    return out


def _summary(name_key: str, name: str, counts: list[int], hist: list[float]) -> dict[str, Any]:
    return {
        name_key: name,
        "requests": counts[0],
        "errors": counts[1],
        "p50": quantile(0.5, hist),
        "p99": quantile(0.99, hist),
        "latency": _latency(hist),
    }


def snapshot(source: MetricsSource) -> dict[str, Any]:
    """Cumulative counters as JSON-ready data: per route, per upstream (with its endpoints)
    and connections. Rates come from the difference of two snapshots."""
    totals = source.metric_totals()
    by_route: dict[str, list[int]] = {}
    by_upstream: dict[str, list[int]] = {}
    by_endpoint: dict[tuple[str, str], list[int]] = {}
    status: dict[str, dict[str, int]] = {}
    for (route, upstream, endpoint, _method, klass), n in totals.requests.items():
        err = n if klass == "5xx" else 0
        for table, key in ((by_route, route), (by_upstream, upstream)):
            row = table.setdefault(key, [0, 0])
            row[0] += n
            row[1] += err
        if upstream:
            row = by_endpoint.setdefault((upstream, endpoint), [0, 0])
            row[0] += n
            row[1] += err
        per = status.setdefault(route, {})
        per[klass] = per.get(klass, 0) + n
    routes = []
    for route in sorted(by_route):
        hist = _merge(h for (r, _u), h in totals.durations.items() if r == route)
        summary = _summary("route", route, by_route[route], hist)
        summary["status"] = status.get(route, {})
        routes.append(summary)
    upstreams = []
    for upstream in sorted(u for u in by_upstream if u):
        hist = _merge(h for (_r, u), h in totals.durations.items() if u == upstream)
        summary = _summary("upstream", upstream, by_upstream[upstream], hist)
        summary["endpoints"] = [
            {"endpoint": ep, "requests": v[0], "errors": v[1]}
            for (u, ep), v in sorted(by_endpoint.items())
            if u == upstream
        ]
        upstreams.append(summary)
    open_, active = totals.connections()
    return {
        "time": time.time(),
        "routes": routes,
        "upstreams": upstreams,
        "connections": {"open": open_, "active": active},
    }
