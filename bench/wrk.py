"""Run wrk for a bounded time and parse its `--latency` report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from procs import pinned

# wrk stops itself after --duration; this is how much longer we wait before killing it.
WRK_GRACE_S = 30

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_NUMBER_UNIT = r"([\d.]+)(us|ms|s|m|h)"
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.M)
_P50 = re.compile(rf"^\s+50%\s+{_NUMBER_UNIT}\s*$", re.M)
_P99 = re.compile(rf"^\s+99%\s+{_NUMBER_UNIT}\s*$", re.M)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    # Socket errors (connect, read, write, timeout) plus non-2xx/3xx answers.
    errors: int
    requests: int = 0  # completed in the measured run


def _latency_ms(pattern: re.Pattern[str], text: str, label: str) -> float:
    match = pattern.search(text)
    if match is None:
        raise ValueError(f"no {label} latency line in wrk output:\n{text}")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse(text: str) -> WrkResult:
    rps = _RPS.search(text)
    if rps is None:
        raise ValueError(f"no Requests/sec line in wrk output:\n{text}")
    errors = 0
    if socket_errors := _SOCKET_ERRORS.search(text):
        errors += sum(int(n) for n in socket_errors.groups())
    if non_2xx := _NON_2XX.search(text):
        errors += int(non_2xx.group(1))
    requests = _REQUESTS.search(text)
    return WrkResult(
        requests=int(requests.group(1)) if requests else 0,
        requests_per_s=float(rps.group(1)),
        p50_ms=_latency_ms(_P50, text, "50%"),
        p99_ms=_latency_ms(_P99, text, "99%"),
        errors=errors,
    )


def _argv(
    url: str,
    duration_s: int,
    connections: int,
    threads: int,
    cpu: int,
    host: str | None,
    headers: tuple[str, ...] = (),
) -> list[str]:
    extra = ["-H", f"Host: {host}"] if host else []
    extra += [arg for header in headers for arg in ("-H", header)]
    return pinned(
        cpu,
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency", *extra, url],
    )


def run(
    url: str,
    *,
    duration_s: int,
    connections: int,
    threads: int,
    cpu: int,
    host: str | None = None,
    headers: tuple[str, ...] = (),
) -> WrkResult:
    """One wrk run; `host` replaces the Host header wrk derives from the URL; `headers`
    ("Name: value") are sent with every request."""
    argv = _argv(url, duration_s, connections, threads, cpu, host, headers)
    # On timeout or Ctrl-C, subprocess.run kills wrk (by its PID) before re-raising.
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration_s + WRK_GRACE_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}) on {url}:\n{done.stderr}")
    return parse(done.stdout)


@dataclass(frozen=True)
class Load:
    """One wrk run to start alongside others."""

    url: str
    host: str | None = None


def run_together(
    loads: list[Load], *, duration_s: int, connections: int, threads: int, cpu: int
) -> list[WrkResult]:
    """Several wrk runs at once, one per load, each with its own connections; results in
    order. Every wrk still running when this returns or raises is killed, by PID."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for load in loads:
            argv = _argv(load.url, duration_s, connections, threads, cpu, load.host)
            procs.append(
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        results = []
        for load, proc in zip(loads, procs, strict=True):
            out, err = proc.communicate(timeout=duration_s + WRK_GRACE_S)
            if proc.returncode != 0:
                raise RuntimeError(f"wrk failed ({proc.returncode}) on {load.url}:\n{err}")
            results.append(parse(out))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
