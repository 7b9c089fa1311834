"""Benchmark Portico against nginx as a reverse proxy, both in front of the same nginx backend.

    python bench/run.py [--duration 10] [--connections 64] [--threads 1] [--workers 1]
                        [--warmup 2] [--out docs-snippet.md] [--skip-portico] [--health-checks]
                        [--routes] [--route-rounds 3] [--metrics]

Layout on a 2-core machine: each proxy on core 0; wrk and the backend on core 1. For each body
size (100 B, 1 MiB) wrk hits the backend directly, Portico and the nginx proxy, after a short
warm-up. With --health-checks, Portico runs from a generated config file with active health
checks on (`portico serve`), to compare with a plain run. With --routes, three more Portico
processes (one catch-all route, 1,000 host routes, 1,000 path routes) get the small body at
the same time, in rounds, compared with the single route. Everything listens on 127.0.0.1 on
kernel-picked ports and every process started here is stopped here, by PID, including on Ctrl-C
or an error. See bench/README.md.

Exit status: 0 all goals met (or Portico skipped), 1 a goal failed or a run broke,
2 a prerequisite is missing, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import metrics
import nginx
import procs
import report
import routes
import wrk

PROXY_CPU = 0  # the proxy under test has a core to itself
LOAD_CPU = 1  # wrk and the backend share the other one
NGINX_BIN = "/usr/sbin/nginx"
INSTALL_HINT = "apt-get install -y nginx-light wrk util-linux"

BODY_PATHS = {"small": nginx.SMALL_PATH, "large": nginx.LARGE_PATH}
EXPECT = {nginx.SMALL_PATH: nginx.SMALL_SIZE, nginx.LARGE_PATH: nginx.LARGE_SIZE}
# Active checks for --health-checks: the cheap body, at the documented example's pace.
HEALTH_PATH = nginx.SMALL_PATH
HEALTH_INTERVAL_S = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up before each run")
    p.add_argument("--connections", type=int, default=64, help="wrk connections")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--workers", type=int, default=1, help="Portico worker processes")
    p.add_argument("--out", type=Path, help="also write a Markdown snippet here")
    p.add_argument("--skip-portico", action="store_true", help="measure direct and nginx only")
    p.add_argument(
        "--static",
        action="store_true",
        help="also measure static files (100 B, 1 MiB) and a 100 KiB JSON body compressed "
        "with gzip, nginx and Portico each serving them",
    )
    p.add_argument(
        "--health-checks",
        action="store_true",
        help=f"run Portico with active health checks (GET {HEALTH_PATH} every "
        f"{HEALTH_INTERVAL_S}s) from a config file, via `portico serve`",
    )
    p.add_argument(
        "--routes",
        action="store_true",
        help=f"also measure the small body with 1 route, {routes.ROUTE_COUNT:,} host routes "
        f"and {routes.ROUTE_COUNT:,} path routes (each via `portico serve`)",
    )
    p.add_argument(
        "--route-rounds",
        type=int,
        default=3,
        help="with --routes: rounds over the three cases; each case's median round is kept",
    )
    p.add_argument(
        "--metrics",
        action="store_true",
        help="also measure the small body with metrics off and on (an [admin] section, "
        "/metrics scraped every second), loaded together in --route-rounds rounds",
    )
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="run Portico from a config with request IDs, header rules both ways and a 90/10 "
        "split (the pipeline issue's acceptance shape), to compare with a plain run",
    )
    p.add_argument(
        "--rate-limit",
        choices=["local", "redis"],
        help="run Portico from a config file with a rate limit every request passes "
        "(never hit): local = the gateway's own table, redis = a redis-server the bench starts",
    )
    args = p.parse_args(argv)
    if args.route_rounds < 1:
        p.error("--route-rounds must be >= 1")
    if (args.routes or args.metrics) and args.skip_portico:
        p.error("--routes and --metrics measure Portico: drop --skip-portico")
    if args.duration < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--duration and --threads must be >= 1, --warmup >= 0")
    if args.connections < args.threads:
        p.error("--connections must be >= --threads (wrk needs one connection per thread)")
    return args


def missing_prerequisites() -> list[str]:
    problems = []
    if not Path(NGINX_BIN).is_file() and shutil.which("nginx") is None:
        problems.append("nginx not found")
    problems += [f"{tool} not found" for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if not {PROXY_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        problems.append(f"need CPUs {PROXY_CPU} and {LOAD_CPU}; have {os.sched_getaffinity(0)}")
    return problems


def portico_command(port: int, backend_port: int, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "portico",
        "proxy",
        "--listen",
        f"127.0.0.1:{port}",
        "--backend",
        f"http://127.0.0.1:{backend_port}",
        "--workers",
        str(workers),
    ]


def portico_config(
    port: int,
    backend_port: int,
    workers: int,
    health: bool = True,
    rate_limit: str | None = None,
    redis_port: int | None = None,
) -> str:
    """TOML for `portico serve`: the same proxy as `portico_command`, plus active checks
    and/or a rate limit keyed by client address that no request reaches."""
    text = f"""\
[server]
listen = ["127.0.0.1:{port}"]
workers = {workers}

[upstreams.bench]
backends = ["http://127.0.0.1:{backend_port}"]
"""
    if health:
        text += f"""
[upstreams.bench.health]
path = "{HEALTH_PATH}"
interval = {HEALTH_INTERVAL_S}
"""
    if rate_limit is not None:
        store = "redis" if rate_limit == "redis" else "local"
        text += f"""
[[routes]]
upstream = "bench"
rate_limit = {{ key = "client_ip", rate = 1000000000, burst = 1000000, store = "{store}" }}
"""
    if rate_limit == "redis":
        text += f"""
[redis]
url = "redis://127.0.0.1:{redis_port}/0"
timeout = 1.0
"""
    return text


def pipeline_config(port: int, backend_port: int, workers: int = 1) -> str:
    """Request IDs, header rules both ways and a weighted split over two upstreams (the same
    backend): the stages a typical migrated nginx config turns on."""
    return f"""\
request_id = true

[server]
listen = ["127.0.0.1:{port}"]
workers = {workers}

[upstreams.blue]
backends = ["http://127.0.0.1:{backend_port}"]

[upstreams.green]
backends = ["http://127.0.0.1:{backend_port}"]

[[routes]]
path = "/"
split = [{{ upstream = "blue", weight = 90 }}, {{ upstream = "green", weight = 10 }}]
request_headers = {{ set = {{ "X-Forwarded-Prefix" = "/" }}, remove = ["X-Debug"] }}
response_headers = {{ set = {{ "X-Frame-Options" = "DENY" }}, remove = ["X-Powered-By"] }}
"""


def portico_static_config(port: int, root: Path, backend_port: int) -> str:
    """TOML for the --static cases: files from `root`, the rest proxied with gzip only, at
    the level nginx uses, so the two compress the same way."""
    return f"""\
[server]
listen = ["127.0.0.1:{port}"]

[upstreams.bench]
backends = ["http://127.0.0.1:{backend_port}"]

[[routes]]
path = "/static/"
static = {{ root = "{root}" }}

[[routes]]
path = "/"
upstream = "bench"
compress = {{ encodings = ["gzip"], levels = {{ gzip = {nginx.GZIP_LEVEL} }} }}
"""


STATIC_BODIES = {
    "static-small": (nginx.STATIC_SMALL_PATH, ()),
    "static-large": (nginx.STATIC_LARGE_PATH, ()),
    "json-gzip": (nginx.JSON_PATH, ("Accept-Encoding: gzip",)),
}


def compressed_size(port: int, path: str) -> tuple[int, int]:
    """(bytes on the wire, decoded bytes) of one gzip response; checks that it decodes."""
    import gzip
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or resp.getheader("Content-Encoding") != "gzip":
            raise RuntimeError(f"{path} on :{port} was not gzip: {resp.status} {resp.headers}")
        return len(body), len(gzip.decompress(body))
    finally:
        conn.close()


def portico_serve_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "portico", "serve", "-c", str(config_path)]


def portico_cli_problem(command: str = "proxy") -> str | None:
    """Why `python -m portico COMMAND --help` does not work, or None if it does."""
    done = subprocess.run(
        [sys.executable, "-m", "portico", command, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return None if done.returncode == 0 else (done.stderr or done.stdout).strip()


def start_nginx(name: str, prefix: Path, conf_path: Path, cpu: int) -> procs.Service:
    nginx_bin = NGINX_BIN if Path(NGINX_BIN).is_file() else shutil.which("nginx") or "nginx"
    argv = procs.pinned(cpu, nginx.command(nginx_bin, prefix, conf_path))
    # nginx appends its own error_log to the same file, so one log tells the whole story.
    return procs.start(name, argv, prefix / "error.log")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(
    args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack
) -> report.Measurements:
    """Start the services (each stopped by `stack`), run every wrk pass, read RSS."""
    services: list[procs.Service] = []
    # nginx, started as root, serves files as an unprivileged worker: let it into the tree.
    tmp.chmod(0o755)

    def up(
        service: procs.Service,
        port: int,
        expect: dict[str, int] = EXPECT,
        host: str | None = None,
    ) -> procs.Service:
        stack.callback(service.stop)
        services.append(service)
        service.wait_ready(port, expect, host)
        progress(f"{service.name} ready on 127.0.0.1:{port} (pid {service.pid})")
        return service

    # Each port is picked just before its service binds it, so they cannot collide.
    backend_port = procs.free_port()
    backend_prefix = tmp / "backend"
    conf_path = nginx.write_instance(
        backend_prefix, nginx.backend_conf(backend_prefix, backend_port)
    )
    nginx.write_large_file(backend_prefix)
    if args.static:
        nginx.write_static_files(nginx.www_dir(backend_prefix))
    up(start_nginx("backend", backend_prefix, conf_path, LOAD_CPU), backend_port)

    proxy_port = procs.free_port()
    proxy_prefix = tmp / "proxy"
    conf_path = nginx.write_instance(
        proxy_prefix, nginx.proxy_conf(proxy_prefix, proxy_port, backend_port)
    )
    nginx_proxy = up(start_nginx("nginx-proxy", proxy_prefix, conf_path, PROXY_CPU), proxy_port)

    targets = {report.DIRECT: backend_port, report.NGINX: proxy_port}
    portico: procs.Service | None = None
    if not args.skip_portico:
        port = procs.free_port()
        if args.pipeline:
            config_path = tmp / "portico.toml"
            config_path.write_text(pipeline_config(port, backend_port, args.workers))
            command = portico_serve_command(config_path)
            progress(f"portico: from {config_path.name}:\n{config_path.read_text()}")
        elif args.health_checks or args.rate_limit:
            redis_port = None
            if args.rate_limit == "redis":
                redis_port = procs.free_port()
                argv = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no"]  # fmt: skip
                redis = procs.start("redis", procs.pinned(LOAD_CPU, argv), tmp / "redis.log")
                stack.callback(redis.stop)
                procs.wait_until(
                    lambda: procs.port_open(redis_port), procs.READY_TIMEOUT_S, "redis-server"
                )
            config_path = tmp / "portico.toml"
            config_path.write_text(
                portico_config(
                    port,
                    backend_port,
                    args.workers,
                    health=args.health_checks,
                    rate_limit=args.rate_limit,
                    redis_port=redis_port,
                )
            )
            command = portico_serve_command(config_path)
            progress(f"portico: from {config_path.name}:\n{config_path.read_text()}")
        else:
            command = portico_command(port, backend_port, args.workers)
        argv = procs.pinned(PROXY_CPU, command)
        portico = up(procs.start("portico", argv, tmp / "portico.log"), port)
        targets[report.PORTICO] = port

    static_targets: dict[str, int] = {}
    if args.static:
        static_expect = {
            nginx.STATIC_SMALL_PATH: nginx.SMALL_SIZE,
            nginx.STATIC_LARGE_PATH: nginx.LARGE_SIZE,
            nginx.JSON_PATH: len(nginx.json_body()),
        }
        static_port = procs.free_port()
        static_prefix = tmp / "nginx-static"
        conf_path = nginx.write_instance(
            static_prefix, nginx.static_conf(static_prefix, static_port, backend_port)
        )
        nginx.write_static_files(nginx.www_dir(static_prefix))
        up(start_nginx("nginx-static", static_prefix, conf_path, PROXY_CPU), static_port,
           static_expect)
        static_targets[report.NGINX] = static_port
        if not args.skip_portico:
            port = procs.free_port()
            www = tmp / "portico-static"
            www.mkdir()
            nginx.write_static_files(www)
            config_path = tmp / "portico-static.toml"
            config_path.write_text(portico_static_config(port, www, backend_port))
            argv = procs.pinned(PROXY_CPU, portico_serve_command(config_path))
            up(procs.start("portico-static", argv, tmp / "portico-static.log"), port, static_expect)
            static_targets[report.PORTICO] = port
        progress(f"static servers ready: {static_targets}")

    results: dict[tuple[str, str], wrk.WrkResult] = {}
    runs = [(body, path, (), targets) for body, path in BODY_PATHS.items()]
    runs += [(body, path, hdrs, static_targets) for body, (path, hdrs) in STATIC_BODIES.items()
             if static_targets]
    for body, path, headers, where in runs:
        for target, port in where.items():
            url = f"http://127.0.0.1:{port}{path}"
            load = {
                "connections": args.connections, "threads": args.threads, "cpu": LOAD_CPU,
                "headers": headers,
            }
            if args.warmup:
                progress(f"{target:8} {body}: warm-up {args.warmup}s")
                wrk.run(url, duration_s=args.warmup, **load)  # type: ignore[arg-type]
            progress(f"{target:8} {body}: measuring {args.duration}s")
            results[target, body] = result = wrk.run(
                url, duration_s=args.duration, **load  # type: ignore[arg-type]
            )
            for service in services:
                service.check_alive()
            progress(
                f"{target:8} {body}: {result.requests_per_s:,.0f} req/s, "
                f"p99 {report.fmt_ms(result.p99_ms)}, {result.errors} errors"
            )

    route_rounds = (
        measure_routes(args, tmp, backend_port, up, services, routes.cases()) if args.routes else []
    )
    metrics_rounds: list[dict[str, report.RouteRun]] = []
    if args.metrics:
        admin_ports = (procs.free_port(), procs.free_port())
        scrape = {metrics.ON: f"http://127.0.0.1:{admin_ports[1]}/metrics"}
        metrics_rounds = measure_routes(
            args, tmp, backend_port, up, services, metrics.cases(admin_ports), scrape
        )

    # Anything logged (nginx at level warn, e.g. "buffered to a temporary file") deserves a look.
    for service in services:
        if tail := service.log_tail(5):
            progress(f"{service.name} log ends:\n{tail}")

    rss = {report.NGINX: procs.rss_bytes(nginx_proxy.pid)}
    if portico is not None:
        rss[report.PORTICO] = procs.rss_bytes(portico.pid)
    for service in services:
        if any(rounds and service.name in rounds[0] for rounds in (route_rounds, metrics_rounds)):
            rss[service.name] = procs.rss_bytes(service.pid)
    sizes = {
        target: compressed_size(port, nginx.JSON_PATH) for target, port in static_targets.items()
    }
    return report.Measurements(results, rss, route_rounds, sizes, metrics_rounds)


def measure_routes(
    args: argparse.Namespace,
    tmp: Path,
    backend_port: int,
    up: Callable[[procs.Service, int, dict[str, int], str | None], procs.Service],
    services: list[procs.Service],
    cases: list[routes.RouteCase],
    scrape: dict[str, str] | None = None,
) -> list[dict[str, report.RouteRun]]:
    """The small body through one Portico per case (route tables, metrics off/on). They are
    loaded at the same time (one wrk each), sharing core 0, so whatever else the machine runs
    slows them all alike and their ratios hold; rounds give medians. ``scrape``: target ->
    a /metrics URL scraped every second while that target is measured."""
    ports: dict[str, int] = {}
    pids: dict[str, int] = {}
    for case in cases:
        port = ports[case.target] = procs.free_port()
        config_path = tmp / f"{case.target}.toml"
        config_path.write_text(routes.config(case, port, backend_port, args.workers))
        argv = procs.pinned(PROXY_CPU, portico_serve_command(config_path))
        log = tmp / f"{case.target}.log"
        # A route table answers only its own requests: check the one wrk will send.
        service = procs.start(case.target, argv, log)
        up(service, port, {case.path: nginx.SMALL_SIZE}, case.host)
        pids[case.target] = service.pid
    rounds: list[dict[str, report.RouteRun]] = []
    load = {"connections": args.connections, "threads": args.threads, "cpu": LOAD_CPU}
    loads = [wrk.Load(f"http://127.0.0.1:{ports[c.target]}{c.path}", c.host) for c in cases]
    for n in range(1, args.route_rounds + 1):
        if args.warmup:
            progress(f"{cases[0].target} and others, round {n}: warm-up {args.warmup}s")
            wrk.run_together(loads, duration_s=args.warmup, **load)
        progress(f"{cases[0].target} and others, round {n}: measuring {args.duration}s")
        cpu_before = {c.target: procs.cpu_seconds(pids[c.target]) for c in cases}
        with contextlib.ExitStack() as scraping:
            scrapers = [scraping.enter_context(metrics.Scraper(u)) for u in (scrape or {}).values()]
            results = wrk.run_together(loads, duration_s=args.duration, **load)
        for scraper in scrapers:
            if scraper.problem or scraper.scrapes < args.duration - 1:
                raise RuntimeError(scraper.problem or f"only {scraper.scrapes} scrapes")
        this_round = {
            c.target: report.RouteRun(
                result, procs.cpu_seconds(pids[c.target]) - cpu_before[c.target]
            )
            for c, result in zip(cases, results, strict=True)
        }
        for service in services:
            service.check_alive()
        for target, run in this_round.items():
            progress(
                f"  {target}: {run.wrk.requests_per_s:,.0f} req/s, "
                f"{run.cpu_us_per_request:.1f} us CPU/request, "
                f"p99 {report.fmt_ms(run.wrk.p99_ms)}, {run.wrk.errors} errors"
            )
        rounds.append(this_round)
    return rounds


def machine_description() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nproc = len(os.sched_getaffinity(0))
    return f"nproc {nproc}, {model}, Linux {platform.release()}"


def load_description(before: float) -> str:
    """The 1-minute load average before and after the runs: how shared the machine was."""
    return f"load average {before:.1f} before the runs, {os.getloadavg()[0]:.1f} after"


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the ExitStack, which stops everything


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if problems := missing_prerequisites():
        print("missing prerequisites: " + "; ".join(problems), file=sys.stderr)
        print(f"install with: {INSTALL_HINT}", file=sys.stderr)
        return 2
    command = "serve" if args.health_checks or args.routes or args.metrics else "proxy"
    if not args.skip_portico and (problem := portico_cli_problem(command)):
        print(f"Portico CLI unavailable:\n{problem}", file=sys.stderr)
        print("rerun with --skip-portico to measure direct and nginx only", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    load_before = os.getloadavg()[0]

    try:
        with (
            tempfile.TemporaryDirectory(prefix="portico-bench-") as tmp,
            contextlib.ExitStack() as stack,
        ):
            measurements = measure(args, Path(tmp), stack)
    except KeyboardInterrupt:
        progress("interrupted; everything started here has been stopped")
        return 130
    except (RuntimeError, TimeoutError, ValueError, subprocess.TimeoutExpired) as exc:
        progress(f"benchmark failed: {exc}")
        return 1

    print(report.text(measurements))
    print(load_description(load_before))
    if args.out is not None:
        args.out.write_text(
            report.markdown(
                measurements,
                command="python " + shlex.join(sys.argv),
                date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"{machine_description()}; {load_description(load_before)}",
            )
        )
        progress(f"wrote {args.out}")
    return 1 if any(check.passed is False for check in report.checks(measurements)) else 0


if __name__ == "__main__":
    sys.exit(main())
