"""Per-request cost of the data plane, counted rather than timed: instructions, system calls,
Python function calls and memory allocations per small keep-alive request.

    python bench/cost.py [--requests 2000] [--config plain|rate-limit|pipeline|all]
                          [--what instr,calls,syscalls]

Wall-clock benchmarks on a shared 2-core machine move by 5-10% between runs; counts do not.
For each measure Portico runs twice under the counting tool, once serving N and once 2N
keep-alive GETs of the 100-byte body from one client, and the difference divided by N is the
cost of one request (start-up, warm-up and shutdown cancel out):

- ``instr``: instructions executed, from ``valgrind --tool=callgrind`` (same binary and input
  give the same count whatever else the machine does), and allocations: calls of CPython's
  object/raw allocators counted in the same callgrind output;
- ``syscalls``: system calls by name, from ``strace -f -c``;
- ``calls``: Python function calls (``cProfile``'s total, C functions included).

``--config rate-limit`` adds a per-client rate limit no request reaches; ``--config pipeline``
runs the pipeline issue's acceptance-style config (request IDs, header
rules on both sides, a 90/10 split) to show what configured stages cost next to the plain
proxy. The backend is the same nginx as bench/run.py's. Every process started here is
stopped here, by PID; everything listens on 127.0.0.1 on kernel-picked ports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil

import nginx
import procs
from run import pipeline_config, portico_config

NGINX_BIN = "/usr/sbin/nginx"
# Requests sent before counting starts in earnest: connection set-up, first-call caches,
# and the pool's first upstream connection are paid here, in both runs alike.
WARMUP_REQUESTS = 200
# callgrind slows Python about 50x: a generous ready timeout for the proxy under it.
READY_TIMEOUT_S = 120.0
ALLOC_FUNCTIONS = ("PyObject_Malloc", "PyMem_Malloc", "PyMem_RawMalloc", "PyObject_Calloc")


def plain_config(port: int, backend_port: int) -> str:
    return f"""\
[server]
listen = ["127.0.0.1:{port}"]

[upstreams.bench]
backends = ["http://127.0.0.1:{backend_port}"]
"""


def rate_limit_config(port: int, backend_port: int) -> str:
    """A per-client rate limit in the gateway's own table that no request reaches."""
    return portico_config(port, backend_port, 1, health=False, rate_limit="local")


CONFIGS = {"plain": plain_config, "pipeline": pipeline_config, "rate-limit": rate_limit_config}


def drive(port: int, count: int) -> None:
    """``count`` sequential keep-alive GETs of the small body on one connection."""
    request = f"GET {nginx.SMALL_PATH} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        buf = b""
        for _ in range(count):
            sock.sendall(request)
            while True:
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    head = buf[:end].lower()
                    m = re.search(rb"content-length: *(\d+)", head)
                    if m is None:
                        raise RuntimeError(f"no Content-Length in {buf[:end]!r}")
                    total = end + 4 + int(m.group(1))
                    if len(buf) >= total:
                        if not buf.startswith(b"HTTP/1.1 200"):
                            raise RuntimeError(f"unexpected answer {buf[:40]!r}")
                        buf = buf[total:]
                        break
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("proxy closed the connection")
                buf += chunk


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on {port} after {timeout} s")


@contextlib.contextmanager
def backend(tmp: Path) -> Iterator[int]:
    port = procs.free_port()
    prefix = tmp / "backend"
    conf = nginx.write_instance(prefix, nginx.backend_conf(prefix, port))
    nginx.write_large_file(prefix)
    svc = procs.start("backend", nginx.command(NGINX_BIN, prefix, conf), tmp / "backend.log")
    try:
        svc.wait_ready(port, {nginx.SMALL_PATH: nginx.SMALL_SIZE})
        yield port
    finally:
        svc.stop()


def run_counted(wrapper: list[str], config: str, tmp: Path, count: int, tag: str) -> Path:
    """Run Portico under ``wrapper`` (which writes its output under tmp/tag*), serve
    WARMUP_REQUESTS + count requests, stop it with SIGTERM so the tool writes its results."""
    port = int(re.search(r"127\.0\.0\.1:(\d+)", config).group(1))  # type: ignore[union-attr]
    cfg = tmp / f"{tag}.toml"
    cfg.write_text(config)
    argv = [*wrapper, sys.executable, "-m", "portico", "serve", "-c", str(cfg)]
    svc = procs.start(tag, argv, tmp / f"{tag}.log")
    try:
        wait_port(port, READY_TIMEOUT_S)
        drive(port, WARMUP_REQUESTS + count)
    finally:
        # Stop Portico itself: a tracer (strace) that gets the signal detaches without its
        # summary; valgrind runs in the same process as Portico, so this is Portico.
        target = psutil.Process(svc.pid)
        children = target.children()
        (children[0] if wrapper and wrapper[0] == "strace" and children else target).terminate()
        try:
            svc.proc.wait(READY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            svc.stop()
    return tmp


def callgrind_counts(path: Path) -> tuple[int, Counter[str]]:
    """(total instructions, calls per allocator function) from one callgrind output file."""
    names: dict[str, str] = {}
    calls: Counter[str] = Counter()
    total = 0
    pending: str | None = None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("summary:") or line.startswith("totals:"):
            total = max(total, int(line.split()[1]))
        elif line.startswith("cfn="):
            m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line)
            if m is None:
                pending = line[4:]
            else:
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                pending = names.get(m.group(1), "")
        elif line.startswith("calls=") and pending is not None:
            if pending in ALLOC_FUNCTIONS:
                calls[pending] += int(line[6:].split()[0])
            pending = None
    return total, calls


def measure_instr(config: str, tmp: Path, n: int) -> dict[str, float]:
    """Instructions and allocations per request: callgrind collects only while the N
    measured requests run (switched on and off with callgrind_control after the warm-up), so
    start-up, imports and shutdown are not in the count at all."""
    out = tmp / "callgrind.out"
    port = int(re.search(r"127\.0\.0\.1:(\d+)", config).group(1))  # type: ignore[union-attr]
    cfg = tmp / "instr.toml"
    cfg.write_text(config)
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            "--instr-atstart=no", sys.executable, "-m", "portico", "serve", "-c", str(cfg)]
    svc = procs.start("instr", argv, tmp / "instr.log")
    try:
        wait_port(port, READY_TIMEOUT_S)
        drive(port, WARMUP_REQUESTS)
        subprocess.run(["callgrind_control", "-i", "on", str(svc.pid)], check=True,
                       capture_output=True)
        drive(port, n)
        subprocess.run(["callgrind_control", "-i", "off", str(svc.pid)], check=True,
                       capture_output=True)
    finally:
        svc.proc.terminate()
        try:
            svc.proc.wait(READY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            svc.stop()
    total, calls = callgrind_counts(out)
    return {"instructions": total / n, "allocations": sum(calls.values()) / n}


def measure_syscalls(config: str, tmp: Path, n: int) -> dict[str, float]:
    counts = []
    for count in (n, 2 * n):
        out = tmp / f"strace.{count}.txt"
        run_counted(["strace", "-f", "-c", "-o", str(out)], config, tmp, count, f"sys-{count}")
        per: Counter[str] = Counter()
        for line in out.read_text().splitlines():
            parts = line.split()
            # "% time  seconds  usecs/call  calls  [errors]  syscall"
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                per[parts[-1]] += int(parts[3])
        counts.append(per)
    diff = {k: (counts[1][k] - counts[0][k]) / n for k in counts[1]}
    out_d = {k: v for k, v in diff.items() if v >= 0.01}
    out_d["total"] = sum(out_d.values())
    return out_d


def measure_calls(config: str, tmp: Path, n: int) -> dict[str, float]:
    totals = []
    for count in (n, 2 * n):
        out = tmp / f"profile.{count}.pstats"
        wrapper_argv = ["-m", "cProfile", "-o", str(out)]
        # cProfile wraps the interpreter itself: [python -m cProfile -o F -m portico ...]
        cfg_port = re.search(r"127\.0\.0\.1:(\d+)", config).group(1)  # type: ignore[union-attr]
        cfg = tmp / f"calls-{count}.toml"
        cfg.write_text(config)
        argv = [sys.executable, *wrapper_argv, "-m", "portico", "serve", "-c", str(cfg)]
        svc = procs.start(f"calls-{count}", argv, tmp / f"calls-{count}.log")
        try:
            wait_port(int(cfg_port), READY_TIMEOUT_S)
            drive(int(cfg_port), WARMUP_REQUESTS + count)
        finally:
            svc.proc.terminate()
            svc.proc.wait(READY_TIMEOUT_S)
        import pstats

        totals.append(pstats.Stats(str(out)).total_calls)  # type: ignore[attr-defined]
    return {"python_calls": (totals[1] - totals[0]) / n}


MEASURES = {"instr": measure_instr, "syscalls": measure_syscalls, "calls": measure_calls}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="N (the second run serves 2N)")
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--what", default="instr,calls,syscalls")
    args = p.parse_args(argv)
    tools = {"instr": "valgrind", "syscalls": "strace"}
    whats = [w for w in args.what.split(",") if w]
    missing = [tools[w] for w in whats if w in tools and shutil.which(tools[w]) is None]
    if missing or not Path(NGINX_BIN).is_file():
        print(f"missing: {missing or 'nginx'}; apt-get install -y valgrind strace nginx-light")
        return 2
    names = list(CONFIGS) if args.config == "all" else [args.config]
    with tempfile.TemporaryDirectory(prefix="portico-cost-") as d:
        tmp = Path(d)
        tmp.chmod(0o755)  # nginx's unprivileged worker reads the backend's files
        # Same hashing in every run, so dict layouts (and their instruction counts) repeat.
        os.environ["PYTHONHASHSEED"] = "0"
        with backend(tmp) as backend_port:
            for name in names:
                for what in whats:
                    port = procs.free_port()
                    config = CONFIGS[name](port, backend_port)
                    sub = tmp / f"{name}-{what}"
                    sub.mkdir()
                    result = MEASURES[what](config, sub, args.requests)
                    for key, value in sorted(result.items(), key=lambda kv: -kv[1]):
                        print(f"{name:9} {what:9} {key:22} {value:12,.2f} per request")
                    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
