"""What the WAF costs: the same route through Portico with and without the OWASP CRS.

    python bench/waf_cost.py [--duration 10] [--warmup 2] [--connections 64] [--rounds 3]
                             [--paranoia 1] [--out snippet.md]

Two `portico serve` processes, identical but for `waf` on the route (CRS at the given
paranoia level, blocking), both pinned to core 0, are loaded **at the same time** by one wrk
each (the backend nginx and wrk share core 1), for a few rounds. Loaded together they suffer
the machine's other load alike, so their ratio holds on a shared machine. The request is a
small GET with a query string (the CRS inspects every argument): `/small?id=42&q=blue+shoes`,
with a host name (a numeric Host adds a CRS warning, 920350, to every request).

For each round: req/s, p99, and CPU time per request of each Portico (user + system from
/proc over the run, divided by the requests wrk completed); then the medians and the ratios.
Needs nginx, wrk, taskset and the WAF (pip install 'portico[waf]', apt install
modsecurity-crs). Every process is stopped by PID on exit. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
from pathlib import Path

import nginx
import procs
import wrk
from run import LOAD_CPU, PROXY_CPU, machine_description, portico_serve_command, start_nginx

PATH = nginx.SMALL_PATH + "?id=42&q=blue+shoes"
HOST = "shop.bench.test"
CRS = "/usr/share/modsecurity-crs/rules"


def config(port: int, backend_port: int, waf: str) -> str:
    return f"""\
[server]
listen = ["127.0.0.1:{port}"]
workers = 1

[upstreams.bench]
backends = ["http://127.0.0.1:{backend_port}"]

[[routes]]
path = "/"
upstream = "bench"
{waf}
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--paranoia", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write a markdown snippet")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import libmodsecurity  # noqa: F401
    except ImportError:
        print("the WAF is not installed: pip install 'portico[waf]'", file=sys.stderr)
        return 2
    if not os.path.isdir(CRS):
        print("the OWASP CRS is not installed: apt install modsecurity-crs", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    targets = {
        "no-waf": "",
        f"waf-pl{args.paranoia}": f"waf = {{ enabled = true, paranoia_level = {args.paranoia} }}",
    }
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)
        backend_port = procs.free_port()
        prefix = tmp / "backend"
        conf = nginx.write_instance(prefix, nginx.backend_conf(prefix, backend_port))
        nginx.write_large_file(prefix)
        backend = start_nginx("backend", prefix, conf, LOAD_CPU)
        stack.callback(backend.stop)
        backend.wait_ready(backend_port, {nginx.SMALL_PATH: nginx.SMALL_SIZE})
        ports: dict[str, int] = {}
        pids: dict[str, int] = {}
        for name, waf in targets.items():
            port = ports[name] = procs.free_port()
            path = tmp / f"{name}.toml"
            path.write_text(config(port, backend_port, waf))
            service = procs.start(
                name, procs.pinned(PROXY_CPU, portico_serve_command(path)), tmp / f"{name}.log"
            )
            stack.callback(service.stop)
            service.wait_ready(port, {PATH: nginx.SMALL_SIZE}, HOST)
            pids[name] = service.pid
            print(f"{name} ready on 127.0.0.1:{port}", file=sys.stderr)
        loads = [wrk.Load(f"http://127.0.0.1:{ports[n]}{PATH}", HOST) for n in targets]
        opts = {"connections": args.connections, "threads": args.threads, "cpu": LOAD_CPU}
        rounds: list[dict[str, tuple[wrk.WrkResult, float]]] = []
        for n in range(1, args.rounds + 1):
            if args.warmup:
                wrk.run_together(loads, duration_s=args.warmup, **opts)
            before = {t: procs.cpu_seconds(pids[t]) for t in targets}
            results = wrk.run_together(loads, duration_s=args.duration, **opts)
            row = {}
            for t, r in zip(targets, results, strict=True):
                cpu_us = (procs.cpu_seconds(pids[t]) - before[t]) / max(r.requests, 1) * 1e6
                row[t] = (r, cpu_us)
                print(
                    f"round {n} {t}: {r.requests_per_s:,.0f} req/s, p99 {r.p99_ms:.2f} ms, "
                    f"{cpu_us:.0f} us CPU/request, {r.errors} errors",
                    file=sys.stderr,
                )
            rounds.append(row)
    names = list(targets)
    base, waf = names
    med = {
        t: (
            statistics.median(r[t][0].requests_per_s for r in rounds),
            statistics.median(r[t][0].p99_ms for r in rounds),
            statistics.median(r[t][1] for r in rounds),
            sum(r[t][0].errors for r in rounds),
        )
        for t in names
    }
    lines = [
        f"`python bench/waf_cost.py --duration {args.duration} --rounds {args.rounds} "
        f"--paranoia {args.paranoia}` on {datetime.date.today()}, {machine_description()}, "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after. "
        f"Both loaded at once, one wrk each ({args.connections} connections), "
        f"`GET {PATH}`; medians of {args.rounds} rounds.",
        "",
        "| target | req/s | p99 | CPU/request | errors |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in names:
        rps, p99, cpu, errors = med[t]
        lines.append(f"| {t} | {rps:,.0f} | {p99:.2f} ms | {cpu:.0f} us | {errors} |")
    lines += [
        "",
        f"Ratio {waf}/{base}: req/s {med[waf][0] / med[base][0]:.2f}, "
        f"CPU per request {med[waf][2] / med[base][2]:.2f}x "
        f"(+{med[waf][2] - med[base][2]:.0f} us per request).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if all(m[3] == 0 for m in med.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
