"""``portico --log-format json``: every line Portico logs, the master's and each worker's, is one
JSON object (a log pipeline needs no parsing rules); the default stays text."""

from __future__ import annotations

import json
from typing import Any

from tests.support.behaviours import respond
from tests.support.processes import listening_workers
from tests.support.proxy import PorticoProcess
from tests.support.waiting import wait_until


def test_json_control_plane_logs_from_master_and_workers(raw_backend: Any) -> None:
    backend = raw_backend(respond())
    proxy = PorticoProcess(
        {
            "server": {"shutdown_grace": 0.5},
            "upstreams": {"app": {"backends": [backend.url]}},
            "routes": [{"path": "/", "upstream": "app"}],
        },
        workers=2,
    )
    argv = proxy.process.argv
    argv[argv.index("serve") : argv.index("serve")] = ["--log-format", "json"]
    proxy.start()
    try:
        wait_until(
            lambda: len(listening_workers(proxy.pid, proxy.port)) == 2, 60, message="2 workers"
        )
    finally:
        proxy.stop()  # SIGTERM: the stopping lines are logged too
    lines = [line for line in proxy.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # a line that is not JSON fails here
    assert {"time", "level", "logger", "pid", "message"} <= set(records[0])
    pids = {r["pid"] for r in records if r["message"].startswith("listening on")}
    assert len(pids) == 2, records  # both workers log in JSON too
    assert any(r["message"].startswith("master") and r["pid"] == proxy.pid for r in records)
    assert all(r["time"].endswith("Z") and r["level"] in ("info", "warning") for r in records)


def test_text_logs_by_default(portico: Any, raw_backend: Any) -> None:
    backend = raw_backend(respond())
    proxy = portico({
        "upstreams": {"app": {"backends": [backend.url]}},
        "routes": [{"path": "/", "upstream": "app"}],
    })  # fmt: skip
    line = wait_until(
        lambda: next((x for x in proxy.output().splitlines() if "listening on" in x), None),
        10,
        message="the listening line",
    )
    assert not line.startswith("{") and " INFO portico[" in line
