"""Turn measurements into the results table, the ratios and the goal checks (pure)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

from wrk import WrkResult

DIRECT, NGINX, PORTICO = "direct", "nginx", "portico"
BODIES = ("small", "large")
MIB = 1024 * 1024

# Goals for Portico, as ratios to nginx on the same machine in the same run.
MIN_RPS_RATIO = {"small": 0.35, "large": 0.6}
MAX_P99_RATIO = 3.0
MAX_RSS_MIB = 60.0


@dataclass(frozen=True)
class Measurements:
    # (target, body) -> result, in the order the runs happened.
    results: dict[tuple[str, str], WrkResult]
    # target -> (RSS bytes, process count) after the runs; only for proxies.
    rss: dict[str, tuple[int, int]]


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
    lines += ["", *_text_table(RATIO_HEADER, ratio_rows(m), left=1), "", *_rss_lines(m), ""]
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
        *(f"- {line}" for line in _rss_lines(m)),
        "",
        "Goals:",
        "",
        *(f"- {c.line()}" for c in checks(m)),
    ]
    return "\n".join(lines) + "\n"
