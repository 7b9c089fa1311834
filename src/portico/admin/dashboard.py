"""The dashboard: one HTML page with a script and a stylesheet (``admin/static``, no build
step, nothing from a CDN), fed live by Server-Sent Events from ``GET /api/stream``.

Every ``STREAM_EVERY`` seconds the stream sends one ``tick``: the upstreams with their
endpoints, the apps with their instances and autoscaler decisions, recent events and, when
metrics are on, the cumulative counters of ``admin.metrics.snapshot``. The page computes req/s
and error rates from two consecutive ticks, so the server keeps no per-client state beyond the
open stream.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from portico.admin import fleet as views
from portico.admin.fleet import Fleet

# Seconds between two ticks of the live stream: smooth enough to watch, cheap to build.
STREAM_EVERY = 1.0
# Live dashboards open at once; each costs one tick's JSON per second.
MAX_STREAMS = 32
# Events sent with every tick (the page shows the recent errors and scaling timeline).
TICK_EVENTS = 60

_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
}


def page() -> bytes:
    return resources.files("portico.admin").joinpath("static/index.html").read_bytes()


def asset(name: str) -> tuple[bytes, str] | None:
    """A file of ``admin/static`` by name (no directories: nothing else is reachable)."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or name.startswith(".") or suffix not in _TYPES:
        return None
    path = resources.files("portico.admin").joinpath(f"static/{name}")
    if not path.is_file():
        return None
    return path.read_bytes(), _TYPES[suffix]


def _metrics_module() -> Any:
    # admin.metrics renders what the data plane counts; it is optional for the API (an
    # install without it still serves everything else).
    try:
        return importlib.import_module("portico.admin.metrics")
    except ImportError:
        return None


def metrics_renderer() -> Callable[[Fleet], tuple[bytes, str]] | None:
    module = _metrics_module()
    if module is None:
        return None
    return lambda fleet: (module.render(fleet), module.CONTENT_TYPE)


def metrics_snapshot(fleet: Fleet) -> dict[str, Any] | None:
    module = _metrics_module()
    admin = fleet.config.admin
    if module is None or (admin is not None and not admin.metrics):
        return None
    data: dict[str, Any] = module.snapshot(fleet)
    return data


class StreamCount:
    def __init__(self, limit: int = MAX_STREAMS) -> None:
        self.limit = limit
        self.open = 0

    def acquire(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open = max(0, self.open - 1)


def tick(fleet: Fleet) -> dict[str, Any]:
    now = asyncio.get_running_loop().time()
    return {
        "time": time.time(),
        "status": views.status_view(fleet),
        "upstreams": views.upstreams_view(fleet),
        "apps": views.apps_view(fleet, now),
        "events": views.events_view(fleet, TICK_EVENTS),
        "metrics": metrics_snapshot(fleet),
    }


async def ticks(fleet: Fleet) -> AsyncIterator[bytes]:
    """The SSE stream: a tick now, then one every ``STREAM_EVERY`` seconds."""
    yield b"retry: 2000\n\n"
    while True:
        data = json.dumps(tick(fleet), separators=(",", ":"))
        yield f"event: tick\ndata: {data}\n\n".encode()
        await asyncio.sleep(STREAM_EVERY)
