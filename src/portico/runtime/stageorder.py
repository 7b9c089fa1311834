"""Configurations that would let a request past authentication, refused by ``portico check``,
at start and on reload.

Inside one route the order is fixed by the compiler (IP rules, CORS preflight, rate limits,
authentication, WAF, then the handler's stages) and cannot be changed by configuration. What
configuration can still get wrong is *which route* a request lands on. These are refused:

1. An unauthenticated route that proxies or serves files, and comes first for some of the
   requests of an authenticated route: all of them (it shadows it), or those of a few
   methods (``methods = ["OPTIONS"]`` beside an authenticated route, the usual workaround
   for preflights that other gateways send to authentication). Those requests would reach
   the upstream without the check. A route that only answers (``respond``, ``redirect``)
   reaches nothing and is allowed.
2. ``cors`` on a route whose ``methods`` leave out OPTIONS: its preflights go to another
   route (or 404), never to its CORS stage, and a browser never sends the real request.

The route order used is the data plane's (the compiled ranking), so this agrees with what
a request would do.
"""

from __future__ import annotations

from portico.config.model import Config
from portico.config.routes import Route, covers, describe


def _reaches_something(route: Route) -> bool:
    return bool(route.upstream or route.split or route.static is not None)


def stage_order(config: Config) -> list[tuple[str, str]]:
    """(key path, reason) for each configuration above; empty when there is none."""
    problems: list[tuple[str, str]] = []
    routes = config.effective_routes()
    for i, route in enumerate(routes):
        if route.cors is not None and route.methods is not None and "OPTIONS" not in route.methods:
            problems.append((
                f"routes[{i}].cors",
                "methods leave out OPTIONS, so preflights never reach this route's CORS stage; "
                "add OPTIONS to methods",
            ))
    if not any(r.auth is not None for r in routes):
        return problems
    from portico.runtime.snapshot import compile_config  # the snapshot imports compile

    ranked = compile_config(config).router.routes
    for pos, later in enumerate(ranked):
        guarded = routes[later.index]
        if guarded.auth is None:
            continue
        for earlier in ranked[:pos]:
            open_route = routes[earlier.index]
            if open_route.auth is not None or not _reaches_something(open_route):
                continue
            name = f"routes[{earlier.index}]"
            if covers(open_route, guarded):
                problems.append((
                    f"routes[{later.index}].auth",
                    f"never runs: {name} ({describe(open_route)}) comes first and takes every "
                    "request of this route without authentication",
                ))
                break
            if open_route.methods is not None and covers(
                open_route.model_copy(update={"methods": None}), guarded
            ):
                methods = "/".join(
                    m for m in open_route.methods
                    if guarded.methods is None or m in guarded.methods
                )
                if not methods:
                    continue
                hint = (
                    f"; to answer CORS preflights set cors on routes[{later.index}] (the gateway "
                    "answers them before authentication)"
                    if "OPTIONS" in open_route.methods
                    else ""
                )
                problems.append((
                    name,
                    f"takes the {methods} requests of routes[{later.index}] to "
                    f"{describe(open_route).rsplit(' ', 1)[-1]} without its authentication"
                    + hint,
                ))
    return problems
