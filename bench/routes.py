"""The routes case: the small body through Portico with one catch-all route, then with 1,000
exact-host routes and with 1,000 path-prefix routes (pure: configs and request targets).

Issue 8's goal is that a large route table costs a request nothing measurable: each big table
must stay within 10% of the single route's req/s, measured in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

import nginx

ROUTE_COUNT = 1000
HOST_SUFFIX = ".bench.test"


@dataclass(frozen=True)
class RouteCase:
    target: str  # label in the results table
    label: str  # what the table holds, for the ratio table
    routes: str  # the [[routes]] part of the config
    path: str  # what wrk requests
    host: str | None  # the Host header wrk sends; None keeps wrk's own (127.0.0.1:port)


def _host_routes(count: int) -> str:
    return "".join(
        f'[[routes]]\nhost = "h{i}{HOST_SUFFIX}"\nupstream = "bench"\n\n' for i in range(count)
    )


def _path_routes(count: int) -> str:
    # Prefixes of several lengths (/svc0/ to /svc999/), as a real table has, so the lookup
    # walks more than one prefix length.
    return "".join(
        f'[[routes]]\npath = "{nginx.ROUTED_PREFIX}{i}/"\nupstream = "bench"\n\n'
        for i in range(count)
    )


def cases(count: int = ROUTE_COUNT) -> list[RouteCase]:
    """The single route first: the others are compared with it. The request matches a route
    in the middle of each table."""
    middle = count // 2
    return [
        RouteCase(
            "portico-1-route",
            "1 catch-all route",
            '[[routes]]\npath = "/"\nupstream = "bench"\n',
            nginx.SMALL_PATH,
            None,
        ),
        RouteCase(
            f"portico-{count}-hosts",
            f"{count:,} exact-host routes",
            _host_routes(count),
            nginx.SMALL_PATH,
            f"h{middle}{HOST_SUFFIX}",
        ),
        RouteCase(
            f"portico-{count}-paths",
            f"{count:,} path-prefix routes",
            _path_routes(count),
            f"{nginx.ROUTED_PREFIX}{middle}{nginx.SMALL_PATH}",
            None,
        ),
    ]


def config(case: RouteCase, port: int, backend_port: int, workers: int) -> str:
    """TOML for `portico serve`: the plain proxy's listener, backend and workers, plus routes."""
    return f"""\
[server]
listen = ["127.0.0.1:{port}"]
workers = {workers}

[upstreams.bench]
backends = ["http://127.0.0.1:{backend_port}"]

{case.routes}"""
