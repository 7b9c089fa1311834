"""The OpenAPI 3.0 document of the admin API, served at ``/api/openapi.json``.

Written by hand next to ``admin.api.ROUTES`` (a unit test checks that both list the same
paths and methods) and checked against the running server by schemathesis: every answer's
status and body must match what is written here.
"""

from __future__ import annotations

from typing import Any

from portico import __version__


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "bad input, with the reason (and problems by key path)",
        401: "no valid bearer token; nothing changed",
        404: "no such upstream, endpoint or app",
        409: "the state does not allow it",
        503: "too many live streams",
    }
    return {str(c): _json(_ref("Error"), reasons[c]) for c in codes}


NULL_INT = {"type": "integer", "nullable": True}
NULL_STR = {"type": "string", "nullable": True}
NULL_NUM = {"type": "number", "nullable": True}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "problems": {"type": "array", "items": _ref("Problem")},
        },
    },
    "Problem": {
        "type": "object",
        "required": ["path", "reason"],
        "properties": {"path": {"type": "string"}, "reason": {"type": "string"}},
    },
    "Endpoint": {
        "type": "object",
        "required": ["endpoint", "state", "healthy", "ejected", "draining", "weight", "in_flight"],
        "properties": {
            "endpoint": {"type": "string", "example": "127.0.0.1:5001"},
            "host": {"type": "string"},
            "port": {"type": "integer"},
            "state": {"type": "string", "enum": ["up", "down", "ejected", "draining"]},
            "healthy": {"type": "boolean"},
            "ejected": {"type": "boolean"},
            "ejected_by": {"type": "integer", "description": "processes ejecting it"},
            "draining": {"type": "boolean"},
            "weight": {"type": "integer"},
            "backup": {"type": "boolean"},
            "in_flight": {"type": "integer"},
            "requests": {"type": "integer"},
        },
    },
    "Upstream": {
        "type": "object",
        "required": ["name", "kind", "endpoints"],
        "properties": {
            "name": {"type": "string"},
            "kind": {"type": "string", "enum": ["backends", "app", "discover"]},
            "balancer": {"type": "string"},
            "health_checks": {"type": "boolean"},
            "unavailable": NULL_STR,
            "in_flight": {"type": "integer"},
            "endpoints": {"type": "array", "items": _ref("Endpoint")},
        },
    },
    "Instance": {
        "type": "object",
        "required": ["id", "port", "state", "age"],
        "properties": {
            "id": {"type": "string"},
            "pid": NULL_INT,
            "container": NULL_STR,
            "port": {"type": "integer"},
            "state": {"type": "string", "enum": ["starting", "ready", "draining", "stopping"]},
            "age": {"type": "number", "description": "seconds since it was started"},
            "cpu": {"type": "number", "description": "CPU % of its process tree"},
            "in_flight": {"type": "integer"},
            "requests": {"type": "integer"},
            "endpoint": NULL_STR,
        },
    },
    "App": {
        "type": "object",
        "required": ["name", "min", "max", "desired", "actual", "instances"],
        "properties": {
            "name": {"type": "string"},
            "min": {"type": "integer"},
            "max": {"type": "integer"},
            "desired": {"type": "integer"},
            "actual": {"type": "integer"},
            "ready": {"type": "integer"},
            "starting": {"type": "integer"},
            "draining": {"type": "integer"},
            "crash_loop": {"type": "boolean"},
            "restarts": {"type": "integer"},
            "autoscale": {"type": "object", "nullable": True},
            "instances": {"type": "array", "items": _ref("Instance")},
        },
    },
    "Event": {
        "type": "object",
        "required": ["at", "source", "kind", "message"],
        "properties": {
            "at": {"type": "number", "description": "unix seconds"},
            "source": {"type": "string"},
            "kind": {"type": "string"},
            "message": {"type": "string"},
        },
    },
    "Status": {
        "type": "object",
        "required": ["version", "pid", "workers", "uptime", "providers"],
        "properties": {
            "version": {"type": "string"},
            "pid": {"type": "integer"},
            "workers": {"type": "integer"},
            "worker_pids": {"type": "array", "items": {"type": "integer"}},
            "started_at": {"type": "number"},
            "uptime": {"type": "number"},
            "listen": {"type": "array", "items": {"type": "string"}},
            "config_file": NULL_STR,
            "upstreams": {"type": "integer"},
            "routes": {"type": "integer"},
            "providers": {
                "type": "object",
                "description": "status of other features by name (TLS, leader election...)",
                "additionalProperties": {"type": "object"},
            },
        },
    },
    "Route": {
        "type": "object",
        "required": ["index", "name", "describe", "upstreams"],
        "properties": {
            "index": {"type": "integer"},
            "name": {"type": "string"},
            "describe": {"type": "string"},
            "upstreams": {"type": "array", "items": {"type": "string"}},
            "config": {"type": "object"},
        },
    },
    "Change": {
        "type": "object",
        "required": ["path"],
        "properties": {"path": {"type": "string"}, "old": {}, "new": {}},
    },
    "ReloadResult": {
        "type": "object",
        "required": ["applied"],
        "properties": {
            "applied": {"type": "boolean"},
            "dry_run": {"type": "boolean"},
            "diff": {"type": "array", "items": _ref("Change")},
            "changed": {"type": "array", "items": {"type": "string"}},
            "restart_required": {"type": "array", "items": {"type": "string"}},
            "error": {"type": "string"},
            "problems": {"type": "array", "items": _ref("Problem")},
        },
    },
}


def _param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1},
    }


UPSTREAM = _param("upstream", "upstream name")
ENDPOINT = _param("endpoint", "endpoint address host:port")
APP = _param("app", "app (upstream) name")
SECURE: list[dict[str, list[str]]] = [{"bearer": []}]


def _action(
    summary: str,
    params: list[dict[str, Any]],
    ok: dict[str, Any],
    *codes: int,
    body: dict[str, Any] | None = None,
    ok_status: str = "200",
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": SECURE,
        "parameters": params,
        "responses": {ok_status: _json(ok, "done"), **_errors(401, 404, *codes)},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return {"post": op}


def _read(
    summary: str,
    schema: dict[str, Any],
    *codes: int,
    params: list[dict[str, Any]] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    """A GET; 401 when admin.read = "token" and no token came, unless ``public``."""
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": _json(schema, "ok"), **_errors(*codes, *(() if public else (401,)))},
    }
    if params:
        op["parameters"] = params
    return {"get": op}


def _text(summary: str, media: str, *codes: int, public: bool = False) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {"description": "ok", "content": {media: {"schema": {"type": "string"}}}},
                **_errors(*codes, *(() if public else (401,))),
            },
        }
    }


ENDPOINT_ACTION = {"type": "object", "required": ["upstream", "endpoint"]}
EP = "/api/upstreams/{upstream}/endpoints/{endpoint}"


def document() -> dict[str, Any]:
    """The whole document (a fresh dict: callers may not share it)."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Portico admin API",
            "version": __version__,
            "description": "Read the fleet; drain, weigh, scale, restart and reload it. "
            "Actions need `Authorization: Bearer <token>` (admin.token / admin.tokens).",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/": _text("the dashboard", "text/html", public=True),
            "/static/{file}": {
                "get": {
                    "summary": "a dashboard asset",
                    "parameters": [_param("file", "file name")],
                    "responses": {
                        "200": {"description": "the file"},
                        **_errors(404),
                    },
                }
            },
            "/metrics": _text("Prometheus exposition", "text/plain", 404),
            "/api/openapi.json": _read("this document", {"type": "object"}, public=True),
            "/api/status": _read("the gateway and other features' status", _ref("Status")),
            "/api/config": _read("the effective config, secrets redacted", {"type": "object"}),
            "/api/routes": _read("routes", {"type": "array", "items": _ref("Route")}),
            "/api/upstreams": _read(
                "upstreams with their endpoints", {"type": "array", "items": _ref("Upstream")}
            ),
            "/api/upstreams/{upstream}": _read(
                "one upstream", _ref("Upstream"), 404, params=[UPSTREAM]
            ),
            "/api/apps": _read(
                "apps with their instances", {"type": "array", "items": _ref("App")}
            ),
            "/api/apps/{app}": _read("one app", _ref("App"), 404, params=[APP]),
            "/api/events": _read(
                "recent events, oldest first",
                {"type": "array", "items": _ref("Event")},
                400,
                params=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    {"name": "kind", "in": "query", "schema": {"type": "string"}},
                ],
            ),
            "/api/stream": _text("live ticks (Server-Sent Events)", "text/event-stream", 503),
            EP + "/drain": _action(
                "drain: no new requests, those in flight finish",
                [UPSTREAM, ENDPOINT],
                ENDPOINT_ACTION,
            ),
            EP + "/undrain": _action(
                "take requests again (409: an app instance its supervisor is stopping)",
                [UPSTREAM, ENDPOINT],
                ENDPOINT_ACTION,
                409,
            ),
            EP + "/weight": _action(
                "set the balancing weight (until the next reload)",
                [UPSTREAM, ENDPOINT],
                ENDPOINT_ACTION,
                400,
                body={
                    "type": "object",
                    "required": ["weight"],
                    "properties": {"weight": {"type": "integer", "minimum": 1, "maximum": 1000}},
                },
            ),
            "/api/apps/{app}/scale": _action(
                "run count instances (the autoscaler held for hold seconds), or set min/max",
                [APP],
                {"type": "object", "required": ["app"]},
                400,
                body={
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "count": {"type": "integer", "minimum": 0},
                        "hold": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
                        "min": {"type": "integer", "minimum": 0},
                        "max": {"type": "integer", "minimum": 1},
                    },
                },
            ),
            "/api/apps/{app}/restart": _action(
                "rolling restart",
                [APP],
                {"type": "object", "required": ["app"]},
                409,
                ok_status="202",
            ),
            "/api/reload": {
                "post": {
                    "summary": "reload from the config file (empty body) or a posted TOML body",
                    "security": SECURE,
                    "parameters": [
                        {"name": "dry_run", "in": "query", "schema": {"type": "boolean"}}
                    ],
                    "requestBody": {
                        "required": False,
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "responses": {
                        "200": _json(_ref("ReloadResult"), "applied (or checked, dry_run)"),
                        "400": _json(_ref("ReloadResult"), "refused, problems by key path"),
                        "401": _json(_ref("Error"), "no valid bearer token"),
                        "409": _json(_ref("Error"), "no config file and no body"),
                    },
                }
            },
        },
    }
