"""The README's first command: three Flask instances under gunicorn behind Portico.

Starts the instances on free loopback ports, runs ``portico proxy`` in front of them on
127.0.0.1:8080 (or ``--port``), and stops everything on Ctrl-C. Refresh the page and watch
the answering instance change.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "flask-app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"instance on port {port} did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--balancer", default="round_robin")
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        backends = []
        for i in range(args.instances):
            port = free_port()
            env = dict(os.environ, INSTANCE=f"app-{i + 1}")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "--chdir", str(APP_DIR),
                     "-b", f"127.0.0.1:{port}", "-w", "1", "--threads", "4",
                     "--log-level", "warning", "app:app"],
                    env=env,
                    start_new_session=True,
                )
            )  # fmt: skip
            backends.append(f"http://127.0.0.1:{port}")
        for url in backends:
            wait_for_port(int(url.rsplit(":", 1)[1]))
        cmd = [sys.executable, "-m", "portico", "proxy", "--listen", f"127.0.0.1:{args.port}",
               "--balancer", args.balancer, "--access-log", "common"]  # fmt: skip
        for url in backends:
            cmd += ["--backend", url]
        print(f"Portico on http://127.0.0.1:{args.port}/ in front of {', '.join(backends)}")
        print("Refresh the page to see the instance change. Ctrl-C stops everything.")
        proxy = subprocess.Popen(cmd, start_new_session=True)
        procs.append(proxy)
        return proxy.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        # Every child leads its own process group, so gunicorn's workers go with it.
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
