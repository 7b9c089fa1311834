"""Admin actions: drain/undrain an endpoint, set its weight, scale an app, restart an app,
reload the config (from its file or a posted TOML body).

Each action checks everything first and changes nothing when it refuses (``ActionError``
carries the status and the reason: 404 for an unknown upstream, endpoint or app, 400 for a
value out of bounds, 409 for a state that does not allow it). Each one that does something is
logged with the name of the token that asked and added to the event log, so the dashboard's
timeline shows who did what next to what the autoscaler and the health checks did.

Endpoint changes go through ``Fleet.set_endpoint``: the gateway applies them to its snapshot
and, with workers, publishes them over ``control.bus`` so every worker's balancer sees them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pydantic import ValidationError

from portico.admin.fleet import Fleet, effective_config
from portico.config.apps import App
from portico.config.load import load_text, problems_from
from portico.control.supervisor import State, Supervisor
from portico.errors import ConfigError
from portico.runtime.endpoint import Endpoint

log = logging.getLogger("portico.admin")

# A fixed count asked for an app with an autoscaler holds this long unless told otherwise:
# long enough to investigate, short enough that a forgotten override does not stay forever.
DEFAULT_HOLD = 300.0
# Longest hold one may ask for (a day).
MAX_HOLD = 86400.0


class ActionError(Exception):
    def __init__(
        self, status: int, reason: str, problems: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.problems = problems or []

    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = {"error": self.reason}
        if self.problems:
            data["problems"] = [{"path": p, "reason": r} for p, r in self.problems]
        return data


def _record(fleet: Fleet, who: str, source: str, what: str) -> None:
    log.info("admin action by %s: %s", who, what)
    orchestrator = fleet.orchestrator()
    if orchestrator is not None:
        orchestrator.events.add(source, "admin", f"{who}: {what}")


def find_endpoint(fleet: Fleet, upstream: str, label: str) -> Endpoint:
    service = fleet.snapshot().services.get(upstream)
    if service is None:
        raise ActionError(404, f"no upstream named {upstream!r}")
    for ep in service.endpoints:
        if ep.label == label:
            return ep
    known = ", ".join(ep.label for ep in service.endpoints) or "none"
    raise ActionError(404, f"upstream {upstream!r} has no endpoint {label!r} (have: {known})")


def set_draining(
    fleet: Fleet, who: str, upstream: str, label: str, draining: bool
) -> dict[str, Any]:
    ep = find_endpoint(fleet, upstream, label)
    if not draining and (why := _leaving(fleet, upstream, label)) is not None:
        raise ActionError(409, f"{upstream}/{label} is leaving ({why}): it cannot be undrained")
    fleet.set_endpoint(upstream, label, draining=draining, weight=None)
    verb = "drain" if draining else "undrain"
    _record(fleet, who, upstream, f"{verb} {upstream}/{label}")
    return {"upstream": upstream, "endpoint": label, "draining": ep.draining}


def _leaving(fleet: Fleet, upstream: str, label: str) -> str | None:
    """Why an app's endpoint is on its way out (its supervisor drains it to stop it), if so."""
    orchestrator = fleet.orchestrator()
    sup = orchestrator.supervisors.get(upstream) if orchestrator is not None else None
    for managed in sup.instances if sup is not None else ():
        ep = managed.endpoint
        if ep is not None and ep.label == label and managed.state is not State.READY:
            return f"{managed.instance.id} is {managed.state.value}"
    return None


def set_weight(
    fleet: Fleet, who: str, upstream: str, label: str, body: dict[str, Any]
) -> dict[str, Any]:
    weight = body.get("weight")
    if not isinstance(weight, int) or isinstance(weight, bool) or not 1 <= weight <= 1000:
        raise ActionError(400, "weight: an integer from 1 to 1000 is needed")
    ep = find_endpoint(fleet, upstream, label)
    old = ep.weight
    fleet.set_endpoint(upstream, label, draining=None, weight=weight)
    _record(fleet, who, upstream, f"weight of {upstream}/{label} {old} -> {weight}")
    return {"upstream": upstream, "endpoint": label, "weight": ep.weight}


def _supervisor(fleet: Fleet, app: str) -> Supervisor:
    orchestrator = fleet.orchestrator()
    sup = orchestrator.supervisors.get(app) if orchestrator is not None else None
    if sup is None:
        raise ActionError(404, f"no app named {app!r}")
    return sup


def scale(fleet: Fleet, who: str, app: str, body: dict[str, Any], now: float) -> dict[str, Any]:
    """``{"count": n, "hold": seconds}``: run n instances (within min..max); an autoscaler
    leaves the count alone for ``hold`` seconds. ``{"min": a, "max": b}``: new bounds (until
    the app's config changes), the count clamped into them."""
    sup = _supervisor(fleet, app)
    orchestrator = fleet.orchestrator()
    assert orchestrator is not None
    scaler = orchestrator.autoscalers.get(app)
    unknown = set(body) - {"count", "hold", "min", "max"}
    if unknown:
        raise ActionError(400, f"unknown key(s): {', '.join(sorted(unknown))}")
    if "count" in body:
        if "min" in body or "max" in body:
            raise ActionError(400, "give count, or min and/or max, not both")
        count = body["count"]
        if not isinstance(count, int) or isinstance(count, bool):
            raise ActionError(400, "count: an integer is needed")
        lo, hi = sup.spec.min, sup.spec.max
        if not lo <= count <= hi:
            raise ActionError(
                400, f"count {count} is outside {app}'s min..max ({lo}..{hi}); change min/max first"
            )
        hold = body.get("hold", DEFAULT_HOLD if scaler is not None else None)
        if hold is not None and (
            not isinstance(hold, int | float) or isinstance(hold, bool) or not 0 < hold <= MAX_HOLD
        ):
            raise ActionError(400, f"hold: seconds from 0 to {MAX_HOLD:g} are needed")
        old = sup.desired
        if scaler is not None and hold is not None:
            scaler.hold_until = now + float(hold)
        sup.set_desired(count)
        held = f", autoscaler held for {hold:g}s" if scaler is not None and hold else ""
        _record(fleet, who, app, f"scale {app} {old} -> {count}{held}")
        return {"app": app, "desired": sup.desired, "hold": hold if scaler is not None else None}
    if "min" not in body and "max" not in body:
        raise ActionError(400, "give count, or min and/or max")
    data = sup.spec.model_dump()
    data.update({k: body[k] for k in ("min", "max") if k in body})
    try:
        spec = App.model_validate(data)
    except ValidationError as exc:
        problems = problems_from(exc, data)
        reason = "; ".join(f"{p}: {r}" for p, r in problems)
        raise ActionError(400, reason, problems) from None
    old_bounds = f"{sup.spec.min}..{sup.spec.max}"
    sup.spec = spec
    if scaler is not None:
        scaler.scaler.rule = dataclasses.replace(
            scaler.scaler.rule, min=max(1, spec.min), max=spec.max
        )
    sup.set_desired(sup.desired)  # clamped into the new bounds
    _record(fleet, who, app, f"bounds of {app} {old_bounds} -> {spec.min}..{spec.max}")
    return {"app": app, "min": spec.min, "max": spec.max, "desired": sup.desired}


def restart(fleet: Fleet, who: str, app: str) -> dict[str, Any]:
    sup = _supervisor(fleet, app)
    if not sup.ready:
        raise ActionError(409, f"{app} has no ready instance to restart")
    orchestrator = fleet.orchestrator()
    assert orchestrator is not None
    orchestrator.rolling_restart(app)
    _record(fleet, who, app, f"rolling restart of {app} ({len(sup.ready)} instance(s))")
    return {"app": app, "restarting": len(sup.ready)}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a config dump by key path (``upstreams.app.backends[0].url``)."""
    out: dict[str, Any] = {}
    if isinstance(value, dict) and value:
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value and any(isinstance(v, dict | list) for v in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = value
    return out


def diff(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    a, b = flatten(old), flatten(new)
    return [
        {"path": path, "old": a.get(path), "new": b.get(path)}
        for path in sorted(a.keys() | b.keys())
        if a.get(path) != b.get(path)
    ]


def reload(fleet: Fleet, who: str, body: bytes, dry_run: bool) -> tuple[int, dict[str, Any]]:
    """Reload from the posted TOML (or the config file when the body is empty). Checked
    first: refused with every problem by key path, the running config untouched."""
    source = "posted body" if body.strip() else fleet.source_path()
    try:
        if body.strip():
            try:
                text = body.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise ConfigError([("body", f"not UTF-8 text (bad byte at {exc.start})")]) from None
            new = load_text(text, "body")
        else:
            loaded = fleet.load_source()
            if loaded is None:
                raise ActionError(409, "no config file to reload from: post a config as the body")
            new = loaded
    except ConfigError as exc:
        problems = list(exc.problems)
        log.warning("admin reload by %s refused: %d problem(s)", who, len(problems))
        return 400, {
            "applied": False,
            "error": "the config has problems; the running config stays",
            "problems": [{"path": p, "reason": r} for p, r in problems],
        }
    changes = diff(effective_config(fleet.config), effective_config(new))
    if dry_run:
        return 200, {"applied": False, "dry_run": True, "diff": changes}
    result = fleet.reload(new)
    if not result.applied:
        return 400, {
            "applied": False,
            "error": "refused; the running config stays",
            "problems": [{"path": p, "reason": r} for p, r in result.problems],
        }
    _record(fleet, who, "config", f"reload from {source}: {len(changes)} change(s)")
    return 200, {
        "applied": True,
        "diff": changes,
        "changed": result.changed,
        "restart_required": result.restart_required,
    }
