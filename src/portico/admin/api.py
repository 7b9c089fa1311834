"""The admin API's routes: who may call what, and which view or action answers.

Reads are ``GET``; actions are ``POST`` and always need a bearer token from
``admin.token``/``admin.tokens`` (or the Unix socket). Tokens are read from the running
config on every request, so a reload that rotates them takes effect at once. Every answer is
JSON, errors included: ``{"error": reason}`` plus ``problems`` by key path where there are
several. The routes here are the ones ``admin.openapi`` documents; a test checks they agree.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from portico.admin import actions, dashboard
from portico.admin import fleet as views
from portico.admin.actions import ActionError
from portico.admin.fleet import Fleet
from portico.admin.openapi import document
from portico.admin.server import Request, Response

# Who may call a route: anyone (the page and its files, the API document: no data in them),
# readers (open unless admin.read = "token"), or holders of a token (actions).
PUBLIC, READ, ACTION = "public", "read", "action"

# Most events one read returns.
MAX_EVENTS = 1000
# Seconds between two looks at the data plane's ejections (for the event log).
WATCH_EVERY = 1.0


def json_response(status: int, data: Any) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":")).encode())


def error(status: int, reason: str, **extra: Any) -> Response:
    headers = [("WWW-Authenticate", 'Bearer realm="portico-admin"')] if status == 401 else []
    response = json_response(status, {"error": reason, **extra})
    response.headers.extend(headers)
    return response


class Api:
    """Dispatches a request to its route. One per admin listener."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.streams = dashboard.StreamCount()
        self.routes: list[tuple[str, re.Pattern[str], Callable[..., Any], str]] = []
        for method, path, fn, access in ROUTES:
            pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
            self.routes.append((method, re.compile(f"^{pattern}$"), fn, access))

    def who(self, request: Request) -> str | None:
        """The name of the caller's token (``unix`` through the socket), or None."""
        if request.via_unix:
            return "unix"
        admin = self.fleet.config.admin
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if admin is None or scheme.lower() != "bearer" or not given:
            return None
        found = None
        for token, name in admin.all_tokens().items():
            # Constant time, and every token compared: timing tells nothing.
            if hmac.compare_digest(token.encode(), given.strip().encode()):
                found = name
        return found

    async def __call__(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        allowed: list[str] = []
        for route_method, pattern, fn, access in self.routes:
            match = pattern.match(request.path)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            who = self.who(request)
            is_action = access == ACTION
            if who is None and (is_action or (access == READ and self._reads_need_token())):
                return self._unauthorized(is_action)
            try:
                reply = fn(self, request, match.groupdict(), who or "anonymous")
                if isinstance(reply, Awaitable):
                    reply = await reply
            except ActionError as exc:
                return json_response(exc.status, exc.body())
            assert isinstance(reply, Response)
            return reply
        if allowed:
            response = error(405, f"{request.method} not allowed here")
            response.headers.append(("Allow", ", ".join(sorted(set(allowed)))))
            return response
        return error(404, f"no such admin route: {request.path}")

    async def watch(self) -> None:
        """Turn state the data plane keeps (ejections, per worker) into events, every
        ``WATCH_EVERY`` seconds, while the listener runs."""
        known: dict[tuple[str, str], int] = {}
        while True:
            await asyncio.sleep(WATCH_EVERY)
            now = dict(self.fleet.ejections())
            orchestrator = self.fleet.orchestrator()
            if orchestrator is not None:
                for upstream, message in views.ejection_changes(known, now):
                    orchestrator.events.add(upstream, "ejection", message)
            known = now

    def _reads_need_token(self) -> bool:
        admin = self.fleet.config.admin
        return admin is not None and admin.read == "token"

    def _unauthorized(self, is_action: bool) -> Response:
        admin = self.fleet.config.admin
        if admin is None or not admin.all_tokens():
            return error(
                401,
                "no admin token is configured: set admin.token (or use admin.unix_socket)",
            )
        what = "actions need" if is_action else "admin.read = token: reads need"
        return error(401, f"{what} a valid bearer token (Authorization: Bearer ...)")


# --- reads ----------------------------------------------------------------------------------


def _index(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    return Response(200, dashboard.page(), "text/html; charset=utf-8")


def _static(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    found = dashboard.asset(p["file"])
    if found is None:
        return error(404, f"no such file: {p['file']}")
    body, content_type = found
    return Response(200, body, content_type)


def _metrics(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    admin = api.fleet.config.admin
    render = dashboard.metrics_renderer()
    if render is None or (admin is not None and not admin.metrics):
        return error(404, "metrics are off (admin.metrics = false)")
    body, content_type = render(api.fleet)
    return Response(200, body, content_type)


def _openapi(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    return json_response(200, document())


def _status(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    return json_response(200, views.status_view(api.fleet))


def _config(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    return json_response(200, views.effective_config(api.fleet.config))


def _routes(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    return json_response(200, views.routes_view(api.fleet.config))


def _upstreams(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    return json_response(200, views.upstreams_view(api.fleet))


def _upstream(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    service = api.fleet.snapshot().services.get(p["upstream"])
    if service is None:
        return error(404, f"no upstream named {p['upstream']!r}")
    view = views.upstream_view(p["upstream"], service, api.fleet.config, api.fleet.ejections())
    return json_response(200, view)


def _now() -> float:
    return asyncio.get_running_loop().time()


def _apps(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    return json_response(200, views.apps_view(api.fleet, _now()))


def _app(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    orchestrator = api.fleet.orchestrator()
    sup = orchestrator.supervisors.get(p["app"]) if orchestrator is not None else None
    if sup is None or orchestrator is None:
        return error(404, f"no app named {p['app']!r}")
    return json_response(200, views.app_view(p["app"], sup, orchestrator, _now()))


def _events(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    text = req.query.get("limit", "100")
    if not text.isdigit() or not 1 <= int(text) <= MAX_EVENTS:
        return error(400, f"limit: a number from 1 to {MAX_EVENTS}")
    kind = req.query.get("kind") or None
    return json_response(200, views.events_view(api.fleet, int(text), kind))


def _stream(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    if not api.streams.acquire():
        return error(503, "too many live dashboards; close one")
    return Response(
        200,
        content_type="text/event-stream",
        stream=dashboard.ticks(api.fleet),
        on_close=api.streams.release,
    )


# --- actions --------------------------------------------------------------------------------


def _body(req: Request) -> dict[str, Any]:
    if not req.body.strip():
        return {}
    try:
        data = json.loads(req.body)
    except (ValueError, UnicodeDecodeError):
        raise ActionError(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise ActionError(400, "the body must be a JSON object")
    return data


def _drain(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    return json_response(
        200, actions.set_draining(api.fleet, who, p["upstream"], p["endpoint"], True)
    )


def _undrain(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    return json_response(
        200, actions.set_draining(api.fleet, who, p["upstream"], p["endpoint"], False)
    )


def _weight(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    body = _body(req)
    return json_response(
        200, actions.set_weight(api.fleet, who, p["upstream"], p["endpoint"], body)
    )


def _scale(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    body = _body(req)
    return json_response(200, actions.scale(api.fleet, who, p["app"], body, _now()))


def _restart(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    return json_response(202, actions.restart(api.fleet, who, p["app"]))


def _reload(api: Api, req: Request, p: dict[str, str], who: str) -> Response:
    flag = req.query.get("dry_run", "false").lower()
    if flag not in ("true", "false", "1", "0"):
        return json_response(400, {"applied": False, "error": "dry_run: true or false"})
    dry_run = flag in ("true", "1")
    status, data = actions.reload(api.fleet, who, req.body, dry_run)
    return json_response(status, data)


EP = "/api/upstreams/{upstream}/endpoints/{endpoint}"

# (method, path, handler, who may call it). The OpenAPI document lists the same paths.
ROUTES: list[tuple[str, str, Callable[..., Any], str]] = [
    ("GET", "/", _index, PUBLIC),
    ("GET", "/static/{file}", _static, PUBLIC),
    ("GET", "/metrics", _metrics, READ),
    ("GET", "/api/openapi.json", _openapi, PUBLIC),
    ("GET", "/api/status", _status, READ),
    ("GET", "/api/config", _config, READ),
    ("GET", "/api/routes", _routes, READ),
    ("GET", "/api/upstreams", _upstreams, READ),
    ("GET", "/api/upstreams/{upstream}", _upstream, READ),
    ("GET", "/api/apps", _apps, READ),
    ("GET", "/api/apps/{app}", _app, READ),
    ("GET", "/api/events", _events, READ),
    ("GET", "/api/stream", _stream, READ),
    ("POST", EP + "/drain", _drain, ACTION),
    ("POST", EP + "/undrain", _undrain, ACTION),
    ("POST", EP + "/weight", _weight, ACTION),
    ("POST", "/api/apps/{app}/scale", _scale, ACTION),
    ("POST", "/api/apps/{app}/restart", _restart, ACTION),
    ("POST", "/api/reload", _reload, ACTION),
]
