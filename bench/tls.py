"""Benchmark HTTPS termination: Portico vs nginx, same certificate, same backend, one run.

    python bench/tls.py [--duration 10] [--connections 64] [--warmup 2] [--workers 1]
                        [--out snippet.md]

Layout as bench/run.py: each proxy pinned to core 0 (nginx with one worker, Portico with
``--workers``), wrk and the backend nginx on core 1. Both proxies terminate TLS with the same
ECDSA P-256 certificate (made here), TLS 1.3 negotiated by wrk's OpenSSL, and proxy plain
HTTP to the backend with pooled keep-alive. Three loads:

- ``small``: keep-alive, 100-byte body (the per-request cost once the handshake is paid);
- ``large``: keep-alive, 1 MiB body (encryption throughput);
- ``handshakes``: ``Connection: close`` on every request, so each is a new TCP connection and
  a full TLS handshake (wrk does not resume sessions): new TLS connections per second.

Goals (issue 10): small >= 0.4x nginx, large >= 0.6x, handshakes >= 0.3x. Exit status 0 when
all are met, 1 otherwise, 2 when a tool is missing. Every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import shutil
import ssl
import sys
import tempfile
from pathlib import Path

import nginx
import procs
import wrk

PROXY_CPU, LOAD_CPU = 0, 1
GOALS = {"small": 0.4, "large": 0.6, "handshakes": 0.3}
LOADS = {
    "small": (nginx.SMALL_PATH, ()),
    "large": (nginx.LARGE_PATH, ()),
    "handshakes": (nginx.SMALL_PATH, ("Connection: close",)),
}


def tls_proxy_conf(prefix: Path, port: int, backend_port: int, cert: Path, key: Path) -> str:
    """nginx's TLS proxy as its docs set it up: TLS 1.2/1.3, session cache, upstream pool."""
    plain = nginx.proxy_conf(prefix, port, backend_port)
    return plain.replace(
        f"listen 127.0.0.1:{port};",
        f"""listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;""",
    )


def write_certificate(directory: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from portico.control.issuers import new_key_pem, self_signed

    key_pem = new_key_pem()
    cert, key = directory / "bench.pem", directory / "bench.key"
    cert.write_bytes(self_signed(["localhost"], key_pem, dt.timedelta(days=1)))
    key.write_bytes(key_pem)
    for path in (cert, key):
        path.chmod(0o644)  # nginx's master reads them as root; fine either way
    return cert, key


def https_size(port: int, path: str) -> int | None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=ctx)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return len(body) if resp.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_https(service: procs.Service, port: int) -> None:
    def ready() -> bool:
        service.check_alive()
        return all(https_size(port, p) == n for p, n in
                   ((nginx.SMALL_PATH, nginx.SMALL_SIZE), (nginx.LARGE_PATH, nginx.LARGE_SIZE)))

    procs.wait_until(ready, procs.READY_TIMEOUT_S, f"{service.name} over HTTPS on :{port}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    missing = [t for t in ("wrk", "taskset", "nginx") if shutil.which(t) is None
               and not (t == "nginx" and Path("/usr/sbin/nginx").exists())]
    if missing:
        print(f"missing: {', '.join(missing)}; apt-get install -y nginx-light wrk util-linux",
              file=sys.stderr)
        return 2
    nginx_bin = "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "nginx"
    with tempfile.TemporaryDirectory(prefix="portico-tls-bench-") as tmp_name, \
            contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)
        cert, key = write_certificate(tmp)

        def start_nginx(name: str, prefix: Path, conf: str, cpu: int) -> procs.Service:
            conf_path = nginx.write_instance(prefix, conf)
            if name == "backend":
                nginx.write_large_file(prefix)
            argv = procs.pinned(cpu, nginx.command(nginx_bin, prefix, conf_path))
            service = procs.start(name, argv, prefix / "error.log")
            stack.callback(service.stop)
            return service

        backend_port = procs.free_port()
        backend = start_nginx("backend", tmp / "backend",
                              nginx.backend_conf(tmp / "backend", backend_port), LOAD_CPU)
        backend.wait_ready(backend_port, {nginx.SMALL_PATH: nginx.SMALL_SIZE})
        nginx_port = procs.free_port()
        proxy = start_nginx("nginx-tls", tmp / "proxy",
                            tls_proxy_conf(tmp / "proxy", nginx_port, backend_port, cert, key),
                            PROXY_CPU)
        wait_https(proxy, nginx_port)
        portico_port = procs.free_port()
        portico_argv = [
            sys.executable, "-m", "portico", "proxy", "--listen", f"127.0.0.1:{portico_port}",
            "--backend", f"http://127.0.0.1:{backend_port}", "--workers", str(args.workers),
            "--tls-cert", str(cert), "--tls-key", str(key),
        ]
        portico = procs.start("portico-tls", procs.pinned(PROXY_CPU, portico_argv),
                              tmp / "portico.log")
        stack.callback(portico.stop)
        wait_https(portico, portico_port)
        results: dict[str, dict[str, wrk.WrkResult]] = {}
        for load, (path, headers) in LOADS.items():
            for name, port in (("nginx", nginx_port), ("portico", portico_port)):
                url = f"https://127.0.0.1:{port}{path}"
                if args.warmup:
                    wrk.run(url, duration_s=args.warmup, connections=args.connections,
                            threads=1, cpu=LOAD_CPU, headers=headers)
                result = wrk.run(url, duration_s=args.duration, connections=args.connections,
                                 threads=1, cpu=LOAD_CPU, headers=headers)
                results.setdefault(load, {})[name] = result
                print(f"{load:10} {name:8} {result.requests_per_s:10.0f} req/s "
                      f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms "
                      f"errors {result.errors}", file=sys.stderr, flush=True)
                for service in (backend, proxy, portico):
                    service.check_alive()
        lines = [
            f"TLS run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {args.duration} s per run,"
            f" {args.connections} connections, Portico workers = {args.workers}:",
            "",
            "| load | nginx req/s | Portico req/s | ratio | goal | Portico p50 / p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        ok = True
        for load, pair in results.items():
            n, pt = pair["nginx"], pair["portico"]
            ratio = pt.requests_per_s / n.requests_per_s if n.requests_per_s else 0.0
            met = ratio >= GOALS[load] and pt.errors == 0
            ok &= met
            lines.append(
                f"| {load} | {n.requests_per_s:,.0f} | {pt.requests_per_s:,.0f} | {ratio:.2f}x |"
                f" {GOALS[load]}x {'met' if met else 'MISSED'} | {pt.p50_ms:.2f} / {pt.p99_ms:.2f}"
                f" | {n.errors} / {pt.errors} |"
            )
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
