"""Request counters of one worker, and their sum over every worker.

Theory of operation. ``RequestMetrics`` lives in the worker's ``ProxyContext`` when metrics
are on (the ``[admin]`` section is configured) and is ``None`` otherwise: the finish path
then pays one ``is not None`` test. ``count`` is called from ``exchange.finish`` only, once
per request, and touches plain dicts keyed by label tuples: no locks, no objects per request.

Workers do not serve scrapes. Every ``STATS_EVERY`` the bus takes the worker's *delta* (the
dicts are swapped for empty ones) and sends it to the master, whose ``MetricTotals`` adds it
to running sums. Deltas, not totals, because the master then needs no per-worker state for
counters: a worker that dies or is replaced leaves its sums in place, so no count ever goes
back, and a new worker simply starts sending from zero. What a worker killed with SIGKILL had
counted since its last report (at most ``STATS_EVERY`` seconds of traffic) is lost; a worker
that stops normally sends a last report after its connections have drained. Gauges (open
connections, in-flight and ejected endpoints) are the opposite: each worker sends its current
values, the master keeps the latest per worker and forgets a worker that is gone.

With one process there is no bus: the scrape folds the delta into the totals itself.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from portico.dataplane.context import ProxyContext
    from portico.runtime.request import RequestState
    from portico.runtime.snapshot import Snapshot

# Latency buckets in seconds (Prometheus ``le`` bounds): from a fast local answer to a slow
# upstream, about three per decade, as the Prometheus client's defaults.
BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

# Methods are a label: anything outside the registered set is "other", so a client cannot
# grow the number of series by inventing methods.
METHOD_NAMES = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
                "other")  # fmt: skip
# Status classes by status // 100; 0 (no status: the client left first) is "other".
CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
# Buckets of a histogram: the bounds and +Inf.
NB = len(BUCKETS) + 1

RequestKey = tuple[str, str, str, str, str]  # route, upstream, endpoint, method, class
Delta = dict[str, dict[Any, Any]]


def metrics_enabled(config: Any) -> bool:
    """Metrics are collected when the admin listener is configured (it serves them)."""
    admin = getattr(config, "admin", None)
    return admin is not None and bool(getattr(admin, "metrics", True))


def _route_name(route: object) -> str:
    return str(getattr(route, "name", "")) if route is not None else ""


# A cell is one flat list per (route, upstream, endpoint): one object to touch per request.
# Its layout: the duration histogram split by method and status class (index: (method * 6 +
# class) * NB + bucket; request counts are its sums over buckets, so one increment counts the
# request and its duration), the sum of durations, the upstream-time histogram and its sum,
# request and response body bytes, retries.
_REQS = len(METHOD_NAMES) * len(CLASSES) * NB
DUR_SUM = _REQS
UP = DUR_SUM + 1
UP_SUM = UP + NB
RECV = UP_SUM + 1
SENT = RECV + 1
RETRIES = SENT + 1
CELL_LEN = RETRIES + 1
_SLOT = {m.encode(): i * len(CLASSES) * NB for i, m in enumerate(METHOD_NAMES[:-1])}
_OTHER_METHOD = (len(METHOD_NAMES) - 1) * len(CLASSES) * NB
_CLASS = tuple(i * NB for i in range(len(CLASSES))) + (0,) * 4  # by status // 100, 0..9
# ``count`` finds the bucket of a fast answer with inline comparisons (a float comparison is
# a few instructions; a call to bisect costs as much as the rest of a bucket's work), and
# bisects only beyond 10 ms. Its constants are these bounds:
assert BUCKETS[:4] == (0.001, 0.0025, 0.005, 0.01)


class RequestMetrics:
    """One worker's counters since its last report. Hot: ``count`` runs per request.

    Per request: one dict lookup by the (route, upstream, endpoint) objects the request
    already holds, then five or six increments in one list. Label strings and the Prometheus
    keying are built at report time (``take``), ten times a second, not per request.
    Measured with callgrind: about 4,900 instructions per request, against 152,000 for the
    whole request (bench/instructions.py)."""

    __slots__ = ("cells", "events", "refused")

    def __init__(self) -> None:
        self.cells: dict[tuple[object, str | None, str | None], list[float]] = {}
        self.refused: dict[tuple[object, str], int] = {}  # (route, reason): rare, kept apart
        # (kind, upstream, endpoint) -> n: ejections and circuit-breaker skips, drained
        # from the services at each report (see ``take_service_events``).
        self.events: dict[tuple[str, str, str], int] = {}

    def count(
        self,
        req: RequestState,
        duration: float,
        # Bound at definition: locals are the cheapest lookups on a path run per request.
        _bisect: Callable[[tuple[float, ...], float], int] = bisect_left,
        _buckets: tuple[float, ...] = BUCKETS,
        _slot: Callable[[bytes, int], int] = _SLOT.get,
        _class: tuple[int, ...] = _CLASS,
    ) -> None:
        """Record one finished request (the only caller is ``exchange.finish``)."""
        key = (req.route, req.service, req.upstream)
        try:
            c = self.cells[key]
        except KeyError:
            c = self.cells[key] = [0] * CELL_LEN
        if duration <= 0.0025:
            b = 0 if duration <= 0.001 else 1
        elif duration <= 0.01:
            b = 2 if duration <= 0.005 else 3
        else:
            b = _bisect(_buckets, duration)
        c[_slot(req.head.method, _OTHER_METHOD) + _class[req.status // 100] + b] += 1
        c[DUR_SUM] += duration
        up_time = req.upstream_time
        if up_time is not None:
            if up_time <= 0.0025:
                b = 0 if up_time <= 0.001 else 1
            elif up_time <= 0.01:
                b = 2 if up_time <= 0.005 else 3
            else:
                b = _bisect(_buckets, up_time)
            c[UP + b] += 1
            c[UP_SUM] += up_time
        received = req.received_bytes
        if received:
            c[RECV] += received
        c[SENT] += req.sent_bytes
        tries = req.tries
        if tries > 1:
            c[RETRIES] += tries - 1
        refused = req.refused
        if refused is not None:
            rkey = (req.route, refused)
            self.refused[rkey] = self.refused.get(rkey, 0) + 1

    def take(self, snapshot: Snapshot) -> Delta:
        """What was counted since the last call, as plain picklable dicts keyed by label
        values; starts afresh."""
        self.take_service_events(snapshot)
        cells, self.cells = self.cells, {}
        requests: dict[RequestKey, int] = {}
        durations: dict[tuple[str, str], list[float]] = {}  # (route, upstream)
        upstream_durations: dict[tuple[str, str], list[float]] = {}  # (upstream, endpoint)
        sizes: dict[str, list[int]] = {}  # route -> [received, sent]
        retries: dict[str, int] = {}
        per_method = len(CLASSES) * NB
        for (route, service, endpoint), c in cells.items():
            rname = _route_name(route)
            upstream, label = service or "", endpoint or ""
            hist = [0.0] * (NB + 1)
            for start in range(0, _REQS, NB):
                row = c[start : start + NB]
                n = int(sum(row))
                if not n:
                    continue
                method, klass = divmod(start, per_method)
                key = (rname, upstream, label, METHOD_NAMES[method], CLASSES[klass // NB])
                requests[key] = requests.get(key, 0) + n
                for i, v in enumerate(row):
                    hist[i] += v
            hist[NB] = c[DUR_SUM]
            _add_hists(durations, {(rname, upstream): hist})
            if any(c[UP:UP_SUM]):
                _add_hists(upstream_durations, {(upstream, label): c[UP : UP_SUM + 1]})
            b = sizes.setdefault(rname, [0, 0])
            b[0] += int(c[RECV])
            b[1] += int(c[SENT])
            if c[RETRIES]:
                retries[upstream] = retries.get(upstream, 0) + int(c[RETRIES])
        refused: dict[tuple[str, str], int] = {}
        for (route, reason), n in self.refused.items():
            refused[_route_name(route), reason] = refused.get((_route_name(route), reason), 0) + n
        self.refused = {}
        events, self.events = self.events, {}
        return {
            "requests": requests,
            "durations": durations,
            "upstream_durations": upstream_durations,
            "bytes": sizes,
            "retries": retries,
            "refused": refused,
            "events": events,
        }

    def take_service_events(self, snapshot: Snapshot) -> None:
        """Ejections and circuit-breaker skips are counted on the services where they
        happen (outlier detection, candidate selection); move them here."""
        events = self.events
        for name, service in snapshot.services.items():
            if service.breaker_skips:
                key = ("breaker_skip", name, "")
                events[key] = events.get(key, 0) + service.breaker_skips
                service.breaker_skips = 0
            if service.ejections:
                for label, n in service.ejections.items():
                    key = ("ejection", name, label)
                    events[key] = events.get(key, 0) + n
                service.ejections.clear()


def gauges(ctx: ProxyContext) -> dict[str, Any]:
    """This worker's current values: connections, and per endpoint in-flight and ejected."""
    conns = ctx.connections
    active = sum(1 for c in conns if getattr(c, "exchange", None) is not None)
    endpoints = {
        (name, ep.label): (ep.in_flight, int(ep.ejected))
        for name, service in ctx.snapshot.services.items()
        for ep in service.endpoints
    }
    return {"open": len(conns), "active": active, "endpoints": endpoints}


def _add_hists(into: dict[Any, list[float]], delta: dict[Any, list[float]]) -> None:
    for key, h in delta.items():
        mine = into.get(key)
        if mine is None:
            into[key] = list(h)
        else:
            for i, v in enumerate(h):
                mine[i] += v


class MetricTotals:
    """Counters summed over every worker that ever reported, and each live worker's gauges."""

    def __init__(self) -> None:
        self.requests: dict[RequestKey, int] = {}
        self.durations: dict[tuple[str, str], list[float]] = {}
        self.upstream_durations: dict[tuple[str, str], list[float]] = {}
        self.bytes: dict[str, list[int]] = {}
        self.retries: dict[str, int] = {}
        self.refused: dict[tuple[str, str], int] = {}
        self.events: dict[tuple[str, str, str], int] = {}
        self.workers: dict[int, dict[str, Any]] = {}  # worker key -> its latest gauges
        self.reports = 0  # deltas added: a test waits on this instead of sleeping

    def add(self, delta: Delta) -> None:
        for name in ("requests", "retries", "refused", "events"):
            into: dict[Any, int] = getattr(self, name)
            for key, n in delta[name].items():
                into[key] = into.get(key, 0) + n
        _add_hists(self.durations, delta["durations"])
        _add_hists(self.upstream_durations, delta["upstream_durations"])
        for key, (received, sent) in delta["bytes"].items():
            b = self.bytes.setdefault(key, [0, 0])
            b[0] += received
            b[1] += sent
        self.reports += 1

    def set_gauges(self, worker: int, values: dict[str, Any]) -> None:
        self.workers[worker] = values

    def drop_worker(self, worker: int) -> None:
        """A worker is gone: its gauges go with it; its counters stay in the sums."""
        self.workers.pop(worker, None)

    def connections(self) -> tuple[int, int]:
        """(open, active) over every live worker."""
        values = self.workers.values()
        return sum(v["open"] for v in values), sum(v["active"] for v in values)

    def endpoint_gauges(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(upstream, endpoint) -> (in-flight, workers that eject it), over every worker."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for values in self.workers.values():
            for key, (in_flight, ejected) in values["endpoints"].items():
                f, e = out.get(key, (0, 0))
                out[key] = (f + in_flight, e + ejected)
        return out


def report_message(ctx: ProxyContext) -> tuple[str, Delta, dict[str, Any]] | None:
    """The worker's ``("metrics", delta, gauges)`` bus message; None when metrics are off."""
    metrics = ctx.metrics
    if metrics is None:
        return None
    return ("metrics", metrics.take(ctx.snapshot), gauges(ctx))


def fold_local(totals: MetricTotals, ctx: ProxyContext) -> None:
    """One process, no bus: bring ``totals`` up to date with this process's counters."""
    message = report_message(ctx)
    if message is not None:
        totals.add(message[1])
        totals.set_gauges(0, message[2])
