"""What the admin API needs of the gateway, as a Protocol the Gateway implements (admin sits
below gateway and never imports it), and the read-only views built from it.

Views are plain JSON-able dicts, built on demand from the live objects: the snapshot (routes,
upstreams, endpoints with their flags and counters), the orchestrator (apps, instances,
autoscalers) and the event log. In the master of several workers the endpoints' in-flight and
request counts are the sum the workers report over ``control.bus``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from portico import __version__
from portico.config.model import Config
from portico.control.orchestrator import Orchestrator
from portico.control.supervisor import Managed, Supervisor
from portico.runtime.endpoint import Endpoint
from portico.runtime.events import Event
from portico.runtime.snapshot import Service, Snapshot
from portico.runtime.status import StatusProviders

# Keys whose values never leave the process through the API: tokens, signing secrets.
SECRET_KEYS = frozenset({"token", "tokens", "secret", "password"})
REDACTED = "<redacted>"


class ReloadOutcome(Protocol):
    applied: bool
    problems: list[tuple[str, str]]
    restart_required: list[str]
    changed: list[str]


class Fleet(Protocol):
    """The gateway as the admin API sees it."""

    config: Config
    status: StatusProviders
    started_at: float  # wall-clock seconds

    def snapshot(self) -> Snapshot: ...
    def reload(self, new: Config) -> ReloadOutcome: ...
    def load_source(self) -> Config | None: ...
    def orchestrator(self) -> Orchestrator | None: ...
    def set_endpoint(
        self, upstream: str, label: str, *, draining: bool | None, weight: int | None
    ) -> None: ...
    def worker_pids(self) -> list[int]: ...
    def ejections(self) -> dict[tuple[str, str], int]: ...
    def source_path(self) -> str | None: ...


def redact(value: Any) -> Any:
    """``value`` (a config dump) with secrets replaced; URLs lose their passwords."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in SECRET_KEYS and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value.partition("://")[2]:
        scheme, _, rest = value.partition("://")
        userinfo, _, host = rest.rpartition("@")
        user = userinfo.partition(":")[0]
        return f"{scheme}://{user}:{REDACTED}@{host}" if ":" in userinfo else value
    return value


def effective_config(config: Config) -> dict[str, Any]:
    data: dict[str, Any] = redact(config.model_dump(mode="json"))
    return data


def endpoint_state(ep: Endpoint) -> str:
    if not ep.up:
        return "down"
    if ep.ejected:
        return "ejected"
    if ep.draining:
        return "draining"
    return "up"


def endpoint_view(ep: Endpoint, ejected_by: int = 0) -> dict[str, Any]:
    """``ejected_by``: processes whose outlier detection ejects it (workers eject on their
    own traffic, so with several workers it may be some of them)."""
    state = endpoint_state(ep)
    if ejected_by and state == "up":
        state = "ejected"
    return {
        "endpoint": ep.label,
        "host": ep.host,
        "port": ep.port,
        "state": state,
        "healthy": ep.up,
        "ejected": bool(ejected_by) or ep.ejected,
        "ejected_by": ejected_by,
        "draining": ep.draining,
        "weight": ep.weight,
        "backup": ep.backup,
        "in_flight": ep.in_flight,
        "requests": ep.requests,
    }


def upstream_view(
    name: str, service: Service, config: Config, ejections: dict[tuple[str, str], int]
) -> dict[str, Any]:
    up = config.upstreams.get(name)
    kind = "backends"
    if up is not None and up.app is not None:
        kind = "app"
    elif up is not None and up.discover is not None:
        kind = "discover"
    return {
        "name": name,
        "kind": kind,
        "balancer": up.balancer if up is not None else "",
        "health_checks": service.health is not None,
        "unavailable": service.unavailable,
        "in_flight": service.active_requests(),
        "endpoints": [
            endpoint_view(ep, ejections.get((name, ep.label), 0)) for ep in service.endpoints
        ],
    }


def upstreams_view(fleet: Fleet) -> list[dict[str, Any]]:
    snapshot = fleet.snapshot()
    ejections = fleet.ejections()
    return [upstream_view(n, s, fleet.config, ejections) for n, s in snapshot.services.items()]


def routes_view(config: Config) -> list[dict[str, Any]]:
    from portico.config.routes import describe

    out = []
    for i, route in enumerate(config.effective_routes()):
        data = route.model_dump(mode="json", exclude_defaults=True)
        out.append(
            {
                "index": i,
                "name": getattr(route, "name", None) or f"routes[{i}]",
                "describe": describe(route),
                "upstreams": route.upstream_names(),
                "config": redact(data),
            }
        )
    return out


def _instance_view(managed: Managed, now: float) -> dict[str, Any]:
    instance = managed.instance
    ep = managed.endpoint
    pid = getattr(instance, "pid", None)
    container = getattr(instance, "container_id", None)
    try:
        cpu = round(instance.cpu_percent(), 1) if instance.alive() else 0.0
    except Exception:  # the process may be gone between alive() and the sample
        cpu = 0.0
    return {
        "id": instance.id,
        "pid": pid if isinstance(pid, int) else None,
        "container": container[:12] if isinstance(container, str) else None,
        "port": instance.port,
        "state": managed.state.value,
        "age": round(now - managed.started_at, 1),
        "cpu": cpu,
        "in_flight": ep.in_flight if ep is not None else 0,
        "requests": ep.requests if ep is not None else 0,
        "endpoint": ep.label if ep is not None else None,
    }


def app_view(name: str, sup: Supervisor, orchestrator: Orchestrator, now: float) -> dict[str, Any]:
    states = [m.state.value for m in sup.instances]
    scaler = orchestrator.autoscalers.get(name)
    autoscale = None
    if scaler is not None:
        autoscale = {
            "metric": scaler.rule.metric,
            "target": scaler.rule.target,
            "hold_until": _wall(getattr(scaler, "hold_until", None), now),
            "decisions": [
                {
                    "current": d.current,
                    "desired": d.desired,
                    "observed": d.observed,
                    "reason": d.reason,
                }
                for d in scaler.decisions[-20:]
            ],
        }
    return {
        "name": name,
        "min": sup.spec.min,
        "max": sup.spec.max,
        "desired": sup.desired,
        "actual": len(sup.counted),
        "ready": states.count("ready"),
        "starting": states.count("starting"),
        "draining": states.count("draining") + states.count("stopping"),
        "crash_loop": sup.crash_loop,
        "restarts": sup.crashes_in_a_row,
        "autoscale": autoscale,
        "instances": [_instance_view(m, now) for m in sup.instances],
    }


def _wall(loop_time: float | None, now: float) -> float | None:
    """A loop-clock deadline as wall-clock seconds (what a client can compare)."""
    if loop_time is None or loop_time <= now:
        return None
    return round(time.time() + (loop_time - now), 1)


def apps_view(fleet: Fleet, now: float) -> list[dict[str, Any]]:
    orchestrator = fleet.orchestrator()
    if orchestrator is None:
        return []
    return [app_view(n, s, orchestrator, now) for n, s in orchestrator.supervisors.items()]


def ejection_changes(
    before: dict[tuple[str, str], int], after: dict[tuple[str, str], int]
) -> list[tuple[str, str]]:
    """(upstream, message) for each endpoint whose ejection began, spread or ended between two
    looks. Ejections are decided in the data plane (per worker); this turns their state into
    events for the log the dashboard shows."""
    changes = []
    for key in sorted(before.keys() | after.keys()):
        upstream, label = key
        old, new = before.get(key, 0), after.get(key, 0)
        if old == new:
            continue
        if new == 0:
            changes.append((upstream, f"{label} back after ejection"))
        elif old == 0:
            changes.append((upstream, f"{label} ejected (outlier detection, {new} process(es))"))
        else:
            changes.append((upstream, f"{label} ejected by {new} process(es) (was {old})"))
    return changes


def event_view(event: Event) -> dict[str, Any]:
    return {"at": event.at, "source": event.source, "kind": event.kind, "message": event.message}


def events_view(fleet: Fleet, limit: int, kind: str | None = None) -> list[dict[str, Any]]:
    orchestrator = fleet.orchestrator()
    if orchestrator is None:
        return []
    return [event_view(e) for e in orchestrator.events.recent(limit, kind)]


def status_view(fleet: Fleet) -> dict[str, Any]:
    config = fleet.config
    return {
        "version": __version__,
        "pid": os.getpid(),
        "workers": config.server.workers,
        "worker_pids": fleet.worker_pids(),
        "started_at": fleet.started_at,
        "uptime": round(time.time() - fleet.started_at, 1),
        "listen": list(config.server.listen),
        "config_file": fleet.source_path(),
        "upstreams": len(config.upstreams),
        "routes": len(config.effective_routes()),
        "providers": fleet.status.collect(),
    }
