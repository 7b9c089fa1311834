"""Turn measurements into the results table, the ratios and the goal checks (pure)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from wrk import WrkResult

DIRECT, NGINX, PORTICO = "direct", "nginx", "portico"
BODIES = ("small", "large")
# --static: files served by each server itself, and a JSON body each compresses with gzip.
STATIC_BODIES = ("static-small", "static-large", "json-gzip")
MIB = 1024 * 1024

# Goals for Portico, as ratios to nginx on the same machine in the same run.
MIN_RPS_RATIO = {"small": 0.35, "large": 0.6, "static-small": 0.3, "static-large": 0.9}
MAX_P99_RATIO = 3.0
MAX_RSS_MIB = 60.0
# Issue 8: a large route table may cost at most 10% of the single route's req/s.
MIN_ROUTES_RATIO = 0.9
# The same budget in CPU time per request, the figure that holds on a loaded machine.
MAX_ROUTES_CPU_RATIO = 1.11  # 1 / MIN_ROUTES_RATIO, rounded
# Issue 12: metrics on (counted, summed, scraped every second) within 5% of metrics off.
MIN_METRICS_RATIO = 0.95
MAX_METRICS_CPU_RATIO = 1.05


@dataclass(frozen=True)
class RouteRun:
    """One measured run of a route-table target: wrk's view and the proxy's CPU time."""

    wrk: WrkResult
    cpu_s: float  # user + system CPU seconds the proxy used during the measured run

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / max(self.wrk.requests, 1) * 1e6


@dataclass(frozen=True)
class Measurements:
    # (target, body) -> result, in the order the runs happened.
    results: dict[tuple[str, str], WrkResult]
    # target -> (RSS bytes, process count) after the runs; only for proxies.
    rss: dict[str, tuple[int, int]]
    # The routes case (--routes): per round, route-table target -> small-body run, the
    # single-route baseline first.
    route_rounds: list[dict[str, RouteRun]] = field(default_factory=list)
    # target -> (gzip bytes, decoded bytes) of the JSON body (--static only).
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The metrics case (--metrics): per round, metrics off (first) and on.
    metrics_rounds: list[dict[str, RouteRun]] = field(default_factory=list)

    def bodies(self) -> list[str]:
        measured = {body for _, body in self.results}
        return [b for b in (*BODIES, *STATIC_BODIES) if b in measured]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass(frozen=True)
class RouteSummary:
    """A route-table target over all rounds: medians, and ratios to the baseline's medians."""

    rps: float
    p99_ms: float
    cpu_us: float
    errors: int  # summed over rounds
    rps_ratio: float
    cpu_ratio: float


def route_summaries(m: Measurements) -> dict[str, RouteSummary]:
    return summarize(m.route_rounds)


def summarize(rounds: list[dict[str, RouteRun]]) -> dict[str, RouteSummary]:
    """Medians over rounds per target, with ratios to the first target's medians."""
    if not rounds:
        return {}
    medians = {
        target: (
            _median([r[target].wrk.requests_per_s for r in rounds]),
            _median([r[target].wrk.p99_ms for r in rounds]),
            _median([r[target].cpu_us_per_request for r in rounds]),
            sum(r[target].wrk.errors for r in rounds),
        )
        for target in rounds[0]
    }
    base_rps, _, base_cpu, _ = next(iter(medians.values()))
    return {
        target: RouteSummary(rps, p99, cpu, errors, rps / base_rps, cpu / base_cpu)
        for target, (rps, p99, cpu, errors) in medians.items()
    }


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
}


@dataclass(frozen=True)
class Check:
    label: str
    value: float | None  # None when Portico was not measured
    op: str  # a key of _OPS: the value passes when `value op limit`
    limit: float

    @property
    def passed(self) -> bool | None:
        return None if self.value is None else _OPS[self.op](self.value, self.limit)

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[self.passed]
        value = "not measured" if self.value is None else f"{self.value:.2f}"
        return f"{verdict}  {self.label}: {value} (goal {self.op} {self.limit:g})"


def ratio(m: Measurements, body: str, num: str, den: str, p99: bool = False) -> float | None:
    a, b = m.results.get((num, body)), m.results.get((den, body))
    if a is None or b is None:
        return None
    return a.p99_ms / b.p99_ms if p99 else a.requests_per_s / b.requests_per_s


def rss_mib(m: Measurements, target: str) -> float | None:
    return m.rss[target][0] / MIB if target in m.rss else None


def checks(m: Measurements) -> list[Check]:
    measured = m.bodies()
    out = [
        Check(f"{body} req/s Portico/nginx", ratio(m, body, PORTICO, NGINX), ">=", limit)
        for body, limit in MIN_RPS_RATIO.items()
        if body in measured
    ]
    out += [
        Check(
            f"{body} p99 Portico/nginx",
            ratio(m, body, PORTICO, NGINX, p99=True),
            "<=",
            MAX_P99_RATIO,
        )
        for body in BODIES
    ]
    out.append(Check("Portico RSS MiB", rss_mib(m, PORTICO), "<", MAX_RSS_MIB))
    summaries = list(route_summaries(m).items())
    if summaries:
        base = summaries[0][0]
        for target, summary in summaries[1:]:
            out.append(
                Check(f"small req/s {target}/{base}", summary.rps_ratio, ">=", MIN_ROUTES_RATIO)
            )
            out.append(
                Check(
                    f"small CPU/request {target}/{base}",
                    summary.cpu_ratio,
                    "<=",
                    MAX_ROUTES_CPU_RATIO,
                )
            )
    pairs = list(summarize(m.metrics_rounds).items())
    if pairs:
        base = pairs[0][0]
        for target, summary in pairs[1:]:
            out.append(
                Check(f"small req/s {target}/{base}", summary.rps_ratio, ">=", MIN_METRICS_RATIO)
            )
            out.append(
                Check(
                    f"small CPU/request {target}/{base}",
                    summary.cpu_ratio,
                    "<=",
                    MAX_METRICS_CPU_RATIO,
                )
            )
    return out


def fmt_ms(ms: float) -> str:
    if ms < 1:
        return f"{ms * 1000:.0f} us"
    if ms < 1000:
        return f"{ms:.2f} ms"
    return f"{ms / 1000:.2f} s"


def _fmt_ratio(value: float | None, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


HEADER = ("target", "body", "req/s", "p50", "p99", "errors")


def table_rows(m: Measurements) -> list[tuple[str, ...]]:
    return [
        (
            target,
            body,
            f"{r.requests_per_s:,.0f}",
            fmt_ms(r.p50_ms),
            fmt_ms(r.p99_ms),
            str(r.errors),
        )
        for (target, body), r in m.results.items()
    ]


def ratio_rows(m: Measurements) -> list[tuple[str, ...]]:
    return [
        (
            body,
            _fmt_ratio(ratio(m, body, PORTICO, NGINX)),
            _fmt_ratio(ratio(m, body, PORTICO, DIRECT)),
            _fmt_ratio(ratio(m, body, PORTICO, NGINX, p99=True), "x"),
        )
        for body in m.bodies()
    ]


RATIO_HEADER = ("body", "req/s Portico/nginx", "req/s Portico/direct", "p99 Portico/nginx")

ROUTES_HEADER = (
    "route table (small body)",
    "req/s",
    "p99",
    "CPU/request",
    "errors",
    "req/s ratio",
    "CPU/request ratio",
)


METRICS_HEADER = ("metrics (small body)", *ROUTES_HEADER[1:])


def routes_rows(
    m: Measurements, rounds: list[dict[str, RouteRun]] | None = None
) -> list[tuple[str, ...]]:
    """Medians over the rounds, with ratios to the first target's medians (the single route,
    or metrics off)."""
    return [
        (
            target,
            f"{s.rps:,.0f}",
            fmt_ms(s.p99_ms),
            f"{s.cpu_us:.1f} us",
            str(s.errors),
            f"{s.rps_ratio:.3f}",
            f"{s.cpu_ratio:.3f}",
        )
        for target, s in summarize(m.route_rounds if rounds is None else rounds).items()
    ]


def rounds_header(
    m: Measurements, rounds: list[dict[str, RouteRun]] | None = None
) -> tuple[str, ...]:
    rounds = m.route_rounds if rounds is None else rounds
    targets = list(rounds[0]) if rounds else []
    return ("round", *(f"{t} req/s, CPU/request" for t in targets))


def rounds_rows(
    m: Measurements, rounds: list[dict[str, RouteRun]] | None = None
) -> list[tuple[str, ...]]:
    """Every round, so the noise the medians hide can be seen."""
    return [
        (
            str(n),
            *(
                f"{r.wrk.requests_per_s:,.0f}, {r.cpu_us_per_request:.1f} us"
                for r in runs.values()
            ),
        )
        for n, runs in enumerate(m.route_rounds if rounds is None else rounds, 1)
    ]


def _rss_lines(m: Measurements) -> list[str]:
    lines = [
        f"{target} RSS: {size / MIB:.1f} MiB ({count} process{'es' if count > 1 else ''})"
        for target, (size, count) in m.rss.items()
    ]
    lines += [
        f"{target} gzip of the JSON body: {wire:,} of {plain:,} bytes "
        f"(ratio {plain / wire:.2f}, {100 * wire / plain:.1f}% of the size)"
        for target, (wire, plain) in m.sizes.items()
    ]
    return lines


def _text_table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int) -> list[str]:
    """Columns before `left` are labels (left-aligned); the rest are figures."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(
            cell.rjust(w) if i >= left else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    ]


def text(m: Measurements) -> str:
    lines = _text_table(HEADER, table_rows(m), left=2)
    lines += ["", *_text_table(RATIO_HEADER, ratio_rows(m), left=1), ""]
    if m.route_rounds:
        lines += [*_text_table(ROUTES_HEADER, routes_rows(m), left=1), ""]
        lines += [*_text_table(rounds_header(m), rounds_rows(m), left=1), ""]
    if m.metrics_rounds:
        mr = m.metrics_rounds
        lines += [*_text_table(METRICS_HEADER, routes_rows(m, mr), left=1), ""]
        lines += [*_text_table(rounds_header(m, mr), rounds_rows(m, mr), left=1), ""]
    lines += [*_rss_lines(m), ""]
    lines += ["Goals:", *(f"  {c.line()}" for c in checks(m))]
    return "\n".join(lines)


def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int) -> list[str]:
    align = ["---" if i < left else "---:" for i in range(len(header))]
    return [f"| {' | '.join(row)} |" for row in [header, tuple(align), *rows]]


def markdown(m: Measurements, *, command: str, date: str, machine: str) -> str:
    lines = [
        f"Measured {date} on {machine}.",
        "",
        "```",
        command,
        "```",
        "",
        *_md_table(HEADER, table_rows(m), left=2),
        "",
        *_md_table(RATIO_HEADER, ratio_rows(m), left=1),
        "",
    ]
    if m.route_rounds:
        lines += [
            f"Route tables: median of {len(m.route_rounds)} rounds; ratios to the single route.",
            "",
            *_md_table(ROUTES_HEADER, routes_rows(m), left=1),
            "",
            *_md_table(rounds_header(m), rounds_rows(m), left=1),
            "",
        ]
    if m.metrics_rounds:
        mr = m.metrics_rounds
        lines += [
            f"Metrics: median of {len(mr)} rounds; ratios to metrics off.",
            "",
            *_md_table(METRICS_HEADER, routes_rows(m, mr), left=1),
            "",
            *_md_table(rounds_header(m, mr), rounds_rows(m, mr), left=1),
            "",
        ]
    lines += [
        *(f"- {line}" for line in _rss_lines(m)),
        "",
        "Goals:",
        "",
        *(f"- {c.line()}" for c in checks(m)),
    ]
    return "\n".join(lines) + "\n"
