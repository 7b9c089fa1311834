"""Endpoint health state: apply an active-check transition to a snapshot, and log it.

Active checks run once per gateway. In a single process the prober's transitions are applied
directly; with several workers the master applies them to its snapshot and sends them to every
worker over ``control.bus``, where each worker applies them to its own copy.
"""

from __future__ import annotations

import logging

from portico.dataplane.outliers import reinstate
from portico.policy.health import Transition
from portico.runtime.endpoint import Endpoint
from portico.runtime.snapshot import Snapshot

log = logging.getLogger("portico.health")

# (upstream name, endpoint label, healthy)
StateMessage = tuple[str, str, bool]


def apply_state(snapshot: Snapshot, upstream: str, label: str, healthy: bool, now: float) -> None:
    """Set one endpoint's ``up`` flag in a snapshot (a no-op if it is no longer there)."""
    service = snapshot.services.get(upstream)
    if service is None:
        return
    for ep in service.endpoints:
        if ep.label == label and ep.up != healthy:
            ep.up = healthy
            if healthy:
                ep.healthy_since = now  # slow start ramps from here
            return


def log_transition(upstream: str, ep: Endpoint, transition: Transition) -> None:
    level = logging.INFO if transition.healthy else logging.WARNING
    log.log(level, "%s %s %s", upstream, ep.label, transition.reason)


def end_ejection(snapshot: Snapshot, upstream: str, label: str, now: float) -> None:
    """A passing active check: an endpoint ejected by outlier detection is back at once (as
    Envoy's ``successful_active_health_check_uneject_host``), so a revived backend gets
    traffic within one check interval rather than after its ejection time."""
    service = snapshot.services.get(upstream)
    if service is not None:
        reinstate(service, label, now)


def release_unchecked(snapshot: Snapshot) -> None:
    """After a reload: endpoints of upstreams that no longer have active checks cannot be
    held down by them; nobody else would ever bring them back up."""
    for service in snapshot.services.values():
        if service.health is None:
            for ep in service.endpoints:
                ep.up = True
