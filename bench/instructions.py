"""Instructions per request, metrics off against on: a figure the machine's load cannot move.

    python bench/instructions.py [--small 500] [--large 4500]

Each case runs `portico serve` (one process) under `valgrind --tool=callgrind` twice, once for
``--small`` and once for ``--large`` keep-alive GETs from one client to a raw backend answering
100 bytes; (instructions of the large run - of the small one) / (large - small) is the cost of
one request, start-up and shutdown cancelled out. Cases: no ``[admin]`` (metrics off), ``[admin]``
with ``metrics = false`` (the listener alone), and ``[admin]`` (metrics on, one scrape at the
end so the counters are read once). Every process started here is stopped here, by PID.
Needs valgrind (Debian package ``valgrind``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import procs

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
REQUEST = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
TOKEN = "bench-admin-token"
READY_TIMEOUT_S = 180.0  # Python's start-up under callgrind is slow


def backend(port: int, stop: threading.Event) -> None:
    """A keep-alive backend that answers every request with 100 bytes (a thread)."""
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(0.2)

    def serve(conn: socket.socket) -> None:
        buf = b""
        with conn:
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, _, buf = buf.partition(b"\r\n\r\n")
                    conn.sendall(RESPONSE)

    with server:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()


def config(port: int, backend_port: int, admin: str | None, admin_port: int) -> str:
    text = f"""\
[server]
listen = ["127.0.0.1:{port}"]
shutdown_grace = 1

[upstreams.bench]
backends = ["http://127.0.0.1:{backend_port}"]

[[routes]]
path = "/"
upstream = "bench"
"""
    if admin is not None:
        text += f'\n[admin]\nlisten = "127.0.0.1:{admin_port}"\ntoken = "{TOKEN}"\n{admin}'
    return text


def send(port: int, n: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        for _ in range(n):
            sock.sendall(REQUEST)
            got = b""
            while not got.endswith(b"x" * 100):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("portico closed the connection")
                got += chunk


def instructions(tmp: Path, name: str, text: str, port: int, n: int, scrape: str | None) -> int:
    path = tmp / f"{name}-{n}.toml"
    path.write_text(text)
    out = tmp / f"{name}-{n}.callgrind"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, "-m", "portico", "serve", "-c", str(path)]  # fmt: skip
    service = procs.start(f"{name}-{n}", argv, tmp / f"{name}-{n}.log")
    try:
        procs.wait_until(lambda: procs.port_open(port), READY_TIMEOUT_S, f"{name} listening")
        send(port, n)
        if scrape is not None:
            with urllib.request.urlopen(scrape, timeout=60) as resp:
                if b"portico_requests_total" not in resp.read():
                    raise RuntimeError("the scrape has no portico_requests_total")
        os.kill(service.pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while service.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        service.stop()
    match = re.search(rb"^(?:summary|totals): (\d+)", out.read_bytes(), re.M)
    if match is None:
        raise RuntimeError(f"no totals in {out}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=500)
    p.add_argument("--large", type=int, default=4500)
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind not found: apt-get install -y valgrind", file=sys.stderr)
        return 2
    stop = threading.Event()
    backend_port = procs.free_port()
    threading.Thread(target=backend, args=(backend_port, stop), daemon=True).start()
    cases = {
        "metrics off (no [admin])": None,
        "[admin], metrics = false": "metrics = false\n",
        "metrics on ([admin])": "",
    }
    per_request: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="portico-instr-") as tmp:
        for name, admin in cases.items():
            counts = []
            for n in (args.small, args.large):
                port, admin_port = procs.free_port(), procs.free_port()
                scrape = f"http://127.0.0.1:{admin_port}/metrics" if admin == "" else None
                text = config(port, backend_port, admin, admin_port)
                slug = re.sub(r"\W+", "-", name).strip("-")
                counts.append(instructions(Path(tmp), slug, text, port, n, scrape))
                print(f"{name}, {n} requests: {counts[-1]:,} instructions", file=sys.stderr)
            per_request[name] = (counts[1] - counts[0]) / (args.large - args.small)
    stop.set()
    base = next(iter(per_request.values()))
    print("| case | instructions/request | ratio |\n| --- | ---: | ---: |")
    for name, value in per_request.items():
        print(f"| {name} | {value:,.0f} | {value / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
