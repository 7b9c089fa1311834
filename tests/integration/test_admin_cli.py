"""``portico status`` and ``portico top`` against a running Portico's admin API (TCP and the
Unix socket), as a user runs them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.admin import AdminClient, with_admin
from tests.support.backends import FLASK_APP_DIR
from tests.support.fleet import fleet, request
from tests.support.ports import free_port
from tests.support.waiting import wait_until


def portico_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portico", *args], capture_output=True, text=True, timeout=timeout
    )


def test_status_and_top(
    portico: PorticoFactory, raw_backend: RawBackendFactory, tmp_path: Path
) -> None:
    a, b = fleet(raw_backend, "a", "b")
    sock = str(tmp_path / "admin.sock")
    config: dict[str, Any] = with_admin(
        {
            "server": {"shutdown_grace": 2.0},
            "upstreams": {
                "pool": {"backends": [a.url, b.url]},
                "web": {"app": {"wsgi": "app:app", "cwd": str(FLASK_APP_DIR), "min": 1}},
            },
            "routes": [{"path": "/", "upstream": "pool"}],
        },
        unix_socket=sock,
    )
    proxy = portico(config)
    client = AdminClient(config)
    wait_until(lambda: client.json("/api/apps/web")["ready"] == 1, 20, message="web ready")
    for _ in range(4):
        request(proxy.port)
    result = portico_cli("status", "-c", str(proxy.config_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(rf"^pool\s+{re.escape(a.label)}\s+up\s+1\s+0\s+2$", out, re.M), out
    assert re.search(r"^web\s+1/1 \(1\.\.4\)\s+web-1\s+\d+\s+\d+\s+ready\s", out, re.M), out
    assert "recent events:" in out and "web: web-1 ready on port" in out
    # --json, through the Unix socket this time.
    result = portico_cli("status", "--unix-socket", sock, "--json")
    data = json.loads(result.stdout)
    assert [u["name"] for u in data["upstreams"]] == ["pool", "web"]
    # top: three screens; the later ones have req/s from the traffic sent meanwhile.
    stop = threading.Event()

    def traffic() -> None:
        for _ in range(200):
            if stop.wait(0.01):
                return
            request(proxy.port)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        result = portico_cli(
            "top", "--admin", client.base, "--count", "3", "--interval", "0.5", timeout=60
        )
    finally:
        stop.set()
        sender.join(30)
    assert result.returncode == 0, result.stderr
    screens = result.stdout.split("\n\n\n")
    assert len([line for line in result.stdout.splitlines() if line.startswith("UPSTREAM")]) == 3
    row = re.compile(rf"^pool\s+{re.escape(a.label)}\s+\w+\s+\d+\s+\d+\s+\d+\s+(\S+)$", re.M)
    rates = [m.group(1) for m in row.finditer(result.stdout)]
    assert len(rates) == 3 and rates[0] == "-", (rates, screens)
    assert max(float(r) for r in rates[1:]) > 0, (rates, screens)


def test_status_reports_an_unreachable_admin_api() -> None:
    result = portico_cli("status", "--admin", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.startswith("portico: cannot read the admin API at http://127.0.0.1:")
