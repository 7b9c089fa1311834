"""Passive health in the data plane: feed request outcomes to the upstream's OutlierDetector
and apply its ejections to endpoints (and their expiry, on a timer)."""

from __future__ import annotations

import asyncio
import logging

from portico.runtime.endpoint import Endpoint
from portico.runtime.snapshot import Service

log = logging.getLogger("portico.health")


def report(
    service: Service, endpoint: Endpoint, ok: bool, reason: str, loop: asyncio.AbstractEventLoop
) -> None:
    """Record one request outcome (``ok=False``: connect failure, reset, timeout or 5xx)."""
    detector = service.outlier
    if detector is None:
        return
    ejection = detector.record(endpoint.label, ok, loop.time(), reason)
    if ejection is None:
        return
    endpoint.ejected = True
    service.ejections[endpoint.label] = service.ejections.get(endpoint.label, 0) + 1
    log.warning("%s %s %s", service.name, endpoint.label, ejection.reason)
    loop.call_at(ejection.until, _expire, service, loop)


def _expire(service: Service, loop: asyncio.AbstractEventLoop) -> None:
    detector = service.outlier
    if detector is None:
        return
    now = loop.time()
    for label in detector.expired(now):
        for ep in service.endpoints:
            if ep.label == label:
                ep.ejected = False
                ep.healthy_since = now  # slow start applies after an ejection too
                log.info("%s %s back after ejection", service.name, label)


def reinstate(service: Service, label: str, now: float) -> bool:
    """End the ejection of endpoint ``label`` now (an active check passed). True if it was
    ejected."""
    detector = service.outlier
    if detector is None or not detector.reinstate(label, now):
        return False
    for ep in service.endpoints:
        if ep.label == label:
            ep.ejected = False
            ep.healthy_since = now  # slow start, as after an expiry
    log.info("%s %s back after ejection: active check passed", service.name, label)
    return True
