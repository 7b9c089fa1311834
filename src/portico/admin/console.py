"""``portico status`` and ``portico top``: the fleet as terminal tables, read from the admin
API (TCP with an optional bearer token, or the Unix socket).

``fetch`` returns the parsed JSON of one read; ``render`` turns one poll (upstreams, apps,
recent events; and for ``top`` the previous poll, to show req/s) into lines of text. The
command line owns the terminal and the loop.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# Seconds one read of the API may take before the command gives up.
TIMEOUT = 5.0


class AdminUnreachable(Exception):
    """The admin API could not be read; the message says where and why."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


@dataclass(slots=True)
class Target:
    """Where the admin API is: ``url`` (http://host:port) or ``unix_socket``."""

    url: str = "http://127.0.0.1:9901"
    token: str | None = None
    unix_socket: str | None = None

    def describe(self) -> str:
        return f"unix:{self.unix_socket}" if self.unix_socket else self.url

    def fetch(self, path: str) -> Any:
        if self.unix_socket:
            conn: http.client.HTTPConnection = _UnixConnection(self.unix_socket, TIMEOUT)
        else:
            parts = urlsplit(self.url if "://" in self.url else f"http://{self.url}")
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                              timeout=TIMEOUT)  # fmt: skip
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            body = response.read()
        except OSError as exc:
            raise AdminUnreachable(f"{self.describe()}: {exc}") from None
        finally:
            conn.close()
        if response.status != 200:
            try:
                reason = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                reason = body[:200].decode("latin-1")
            raise AdminUnreachable(f"{self.describe()}{path}: {response.status} {reason}")
        return json.loads(body)


@dataclass(slots=True)
class Poll:
    at: float
    status: dict[str, Any]
    upstreams: list[dict[str, Any]]
    apps: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)


def poll(target: Target, events: int = 5) -> Poll:
    return Poll(
        time.monotonic(),
        target.fetch("/api/status"),
        target.fetch("/api/upstreams"),
        target.fetch("/api/apps"),
        target.fetch(f"/api/events?limit={events}") if events else [],
    )


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; numbers would look the same either way."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]  # fmt: skip
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip()]
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return out


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(now: Poll, before: Poll | None = None, rates: bool = False) -> list[str]:
    """The lines of one screen. With ``rates`` (``top``), a REQ/S column: the change since
    ``before`` ("-" on the first screen)."""
    s = now.status
    lines = [
        f"portico {s['version']}  pid {s['pid']}  workers {s['workers']}  "
        f"up {_age(s['uptime'])}  listen {', '.join(s['listen'])}",
        "",
    ]
    kube = s.get("providers", {}).get("kubernetes", {}).get("leader")
    if kube:
        role = "leader" if kube.get("leader") else f"follower (leader: {kube.get('holder')})"
        lines[-1:-1] = [f"kubernetes: {role}"]
    seconds = now.at - before.at if before is not None else 0.0
    old = {
        (u["name"], e["endpoint"]): e["requests"]
        for u in (before.upstreams if before else [])
        for e in u["endpoints"]
    }
    rows = []
    for up in now.upstreams:
        for ep in up["endpoints"]:
            row = [up["name"], ep["endpoint"], ep["state"], str(ep["weight"]),
                   str(ep["in_flight"]), str(ep["requests"])]  # fmt: skip
            if rates:
                prev = old.get((up["name"], ep["endpoint"]))
                if prev is None or not seconds:
                    row.append("-")
                else:
                    row.append(f"{(ep['requests'] - prev) / seconds:.1f}")
            rows.append(row)
    headers = ["upstream", "endpoint", "state", "weight", "in-flight", "requests"]
    lines += table(headers + (["req/s"] if rates else []), rows)
    if now.apps:
        lines.append("")
        rows = []
        for app in now.apps:
            for inst in app["instances"]:
                rows.append([
                    app["name"], f"{app['actual']}/{app['desired']} ({app['min']}..{app['max']})",
                    inst["id"], str(inst["pid"] or inst["container"] or ""), str(inst["port"]),
                    inst["state"], _age(inst["age"]), f"{inst['cpu']:.1f}%",
                    str(inst["in_flight"]),
                ])  # fmt: skip
            if not app["instances"]:
                rows.append([app["name"], f"0/{app['desired']} ({app['min']}..{app['max']})",
                             "-", "", "", "", "", "", ""])  # fmt: skip
        lines += table(
            ["app", "actual/desired", "instance", "pid", "port", "state", "age", "cpu",
             "in-flight"],
            rows,
        )  # fmt: skip
    if now.events:
        lines.append("")
        lines.append("recent events:")
        for e in now.events:
            stamp = time.strftime("%H:%M:%S", time.localtime(e["at"]))
            lines.append(f"  {stamp} {e['source']}: {e['message']}")
    return lines
