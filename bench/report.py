"""Turn measurements into the results table, the ratios and the goal checks (pure)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

from wrk import WrkResult

DIRECT, NGINX, PORTICO = "direct", "nginx", "portico"
BODIES = ("small", "large")
MIB = 1024 * 1024

# Goals for Portico, as ratios to nginx on the same machine in the same run.
MIN_RPS_RATIO = {"small": 0.35, "large": 0.6}
MAX_P99_RATIO = 3.0
MAX_RSS_MIB = 60.0
# Issue 8: a large route table may cost at most 10% of the single route's req/s.
MIN_ROUTES_RATIO = 0.9


@dataclass(frozen=True)
class Measurements:
    # (target, body) -> result, in the order the runs happened.
    results: dict[tuple[str, str], WrkResult]
    # target -> (RSS bytes, process count) after the runs; only for proxies.
    rss: dict[str, tuple[int, int]]
    # The routes case (--routes): per round, route-table target -> small-body result, the
    # single-route baseline first.
    route_rounds: list[dict[str, WrkResult]] = field(default_factory=list)


def route_medians(m: Measurements) -> dict[str, WrkResult]:
    """Each route target's median round by req/s (the upper median for an even count)."""
    if not m.route_rounds:
        return {}
    out = {}
    for target in m.route_rounds[0]:
        runs = sorted((r[target] for r in m.route_rounds), key=lambda w: w.requests_per_s)
        out[target] = runs[len(runs) // 2]
    return out


def route_ratios(m: Measurements) -> dict[str, tuple[float, float]]:
    """target -> (req/s, p99) of its median round over the baseline's (the first target)."""
    medians = route_medians(m)
    if not medians:
        return {}
    base = next(iter(medians.values()))
    return {
        target: (r.requests_per_s / base.requests_per_s, r.p99_ms / base.p99_ms)
        for target, r in medians.items()
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
    out = [
        Check(f"{body} req/s Portico/nginx", ratio(m, body, PORTICO, NGINX), ">=", limit)
        for body, limit in MIN_RPS_RATIO.items()
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
    ratios = list(route_ratios(m).items())
    out += [
        Check(f"small req/s {target}/{ratios[0][0]}", rps, ">=", MIN_ROUTES_RATIO)
        for target, (rps, _) in ratios[1:]
    ]
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
        for body in BODIES
    ]


RATIO_HEADER = ("body", "req/s Portico/nginx", "req/s Portico/direct", "p99 Portico/nginx")

ROUTES_HEADER = ("route table (small body)", "req/s", "p50", "p99", "errors", "req/s ratio",
                 "p99 ratio")


def routes_rows(m: Measurements) -> list[tuple[str, ...]]:
    """Median rounds, with ratios to the single route."""
    ratios = route_ratios(m)
    return [
        (
            target,
            f"{r.requests_per_s:,.0f}",
            fmt_ms(r.p50_ms),
            fmt_ms(r.p99_ms),
            str(r.errors),
            f"{ratios[target][0]:.3f}",
            f"{ratios[target][1]:.2f}x",
        )
        for target, r in route_medians(m).items()
    ]


def rounds_header(m: Measurements) -> tuple[str, ...]:
    return ("round", *(f"{t} req/s" for t in m.route_rounds[0])) if m.route_rounds else ()


def rounds_rows(m: Measurements) -> list[tuple[str, ...]]:
    """Every round, so the noise the medians hide can be seen."""
    rows = []
    for n, results in enumerate(m.route_rounds, 1):
        base = next(iter(results.values())).requests_per_s
        rows.append(
            (
                str(n),
                *(
                    f"{r.requests_per_s:,.0f} ({r.requests_per_s / base:.2f})"
                    for r in results.values()
                ),
            )
        )
    return rows


def _rss_lines(m: Measurements) -> list[str]:
    return [
        f"{target} RSS: {size / MIB:.1f} MiB ({count} process{'es' if count > 1 else ''})"
        for target, (size, count) in m.rss.items()
    ]


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
    lines += [
        *(f"- {line}" for line in _rss_lines(m)),
        "",
        "Goals:",
        "",
        *(f"- {c.line()}" for c in checks(m)),
    ]
    return "\n".join(lines) + "\n"
