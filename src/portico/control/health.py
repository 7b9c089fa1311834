"""Endpoint health state: apply transitions, and carry them from the master to workers.

Active checks run once per gateway. In a single process the prober's transitions are applied
directly. With several workers the master runs the prober and sends every transition down a
one-way pipe to each worker, which applies it to its own copy of the endpoint; a new worker
first gets the full current state. Messages are small tuples, pickled by ``multiprocessing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from multiprocessing.connection import Connection

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


def full_state(snapshot: Snapshot) -> list[StateMessage]:
    """Every endpoint's state, for a worker that has just started."""
    return [
        (name, ep.label, ep.up)
        for name, service in snapshot.services.items()
        for ep in service.endpoints
    ]


class StatePublisher:
    """The master's end of the pipes to its workers."""

    def __init__(self) -> None:
        self._pipes: dict[int, Connection] = {}

    def add(self, key: int, pipe: Connection, snapshot: Snapshot) -> None:
        self._pipes[key] = pipe
        for message in full_state(snapshot):
            self._send(key, message)

    def remove(self, key: int) -> None:
        pipe = self._pipes.pop(key, None)
        if pipe is not None:
            pipe.close()

    def publish(self, message: StateMessage) -> None:
        for key in list(self._pipes):
            self._send(key, message)

    def _send(self, key: int, message: StateMessage) -> None:
        try:
            self._pipes[key].send(message)
        except (BrokenPipeError, OSError):
            self.remove(key)  # the worker is gone; the master will replace it

    def close(self) -> None:
        for key in list(self._pipes):
            self.remove(key)


def follow_state(
    pipe: Connection, loop: asyncio.AbstractEventLoop, snapshot_of: Callable[[], Snapshot]
) -> None:
    """Worker side: apply every state message from the master as it arrives."""

    def readable() -> None:
        try:
            while pipe.poll():
                upstream, label, healthy = pipe.recv()
                apply_state(snapshot_of(), upstream, label, healthy, loop.time())
        except (EOFError, OSError):
            # The master is gone; PR_SET_PDEATHSIG stops this worker shortly.
            with contextlib.suppress(Exception):
                loop.remove_reader(pipe.fileno())

    loop.add_reader(pipe.fileno(), readable)
