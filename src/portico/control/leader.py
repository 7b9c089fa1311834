"""Leader election among Portico replicas with a coordination.k8s.io/v1 Lease.

Every ``renew_every`` seconds each replica reads the Lease and does what
``policy.lease.next_step`` says: create it, renew it (the holder), take it over (free, or
not renewed for ``leaseDurationSeconds`` by this replica's clock), or follow. Every write
carries the resourceVersion it read, so when two replicas race for an expired Lease the API
takes one write and answers the other 409 Conflict: that one follows.

The leader runs the autoscalers and rolling restarts; every replica follows EndpointSlices
and serves traffic alike. On a clean shutdown the leader releases the Lease (holder
emptied) so a follower takes over on its next try rather than after the lease duration.

``status()`` is what the admin API shows: who leads, and whether it is us.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
from typing import Any

from portico.config.kube import LeaderElection
from portico.control.kubeapi import KubeApi, KubeError
from portico.policy.lease import Record, Step, leading, next_step, renew_deadline
from portico.runtime.events import EventLog

log = logging.getLogger("portico.leader")


def default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def micro_time() -> str:
    """A MicroTime as the API writes it: RFC 3339 with microseconds, UTC."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_path(namespace: str, name: str = "") -> str:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return f"{base}/{name}" if name else base


class LeaderElector:
    def __init__(self, spec: LeaderElection, api: KubeApi, events: EventLog) -> None:
        self.spec = spec
        self.api = api
        self.events = events
        self.identity = spec.identity or default_identity()
        self.namespace = ""
        self.record: Record | None = None
        self.seen_since = 0.0  # when (our clock) the current record was first seen
        self.renewed_at: float | None = None  # our last successful write as holder
        self.renewed_wall: str | None = None
        self.problem: str | None = None
        self._deadline = renew_deadline(spec.lease_duration, spec.renew_every)
        self._was_leading = False
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<LeaderElector {self.identity} leading={self.is_leader()}>"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="leader election")

    def is_leader(self) -> bool:
        now = asyncio.get_running_loop().time()
        return leading(self.renewed_at, now, self._deadline)

    def status(self) -> dict[str, Any]:
        """JSON-able: what the admin API shows under "leader"."""
        record = self.record
        return {
            "leader": self.is_leader(),
            "identity": self.identity,
            "holder": record.holder if record is not None and record.holder else None,
            "renewed": record.renew_time if record is not None else None,
            "lease": f"{self.namespace or '?'}/{self.spec.lease}",
            "transitions": record.transitions if record is not None else 0,
            "problem": self.problem,
        }

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.is_leader() and self.record is not None:
            try:  # release: the next follower's try takes over
                await self._write(self.record, holder="", duration=1)
                log.info("leader %s: released lease %s", self.identity, self.spec.lease)
            except KubeError as exc:
                log.warning("leader %s: could not release the lease: %s", self.identity, exc)
        self.renewed_at = None

    # --- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.api.open()
                self.namespace = self.spec.namespace or self.api.namespace
                await self._try(loop.time())
                self.problem = None
            except KubeError as exc:
                message = exc.explain()
                if message != self.problem:
                    self.events.add("leader", "kubernetes", message)
                    log.warning("leader election: %s", message)
                self.problem = message
            self._announce()
            await asyncio.sleep(self.spec.renew_every)

    def _announce(self) -> None:
        now_leading = self.is_leader()
        if now_leading != self._was_leading:
            self._was_leading = now_leading
            said = "leads" if now_leading else "no longer leads"
            self.events.add("leader", "leader", f"{self.identity} {said}")
            log.info("leader election: %s %s (lease %s)", self.identity, said, self.spec.lease)

    async def _try(self, now: float) -> None:
        record = await self._read()
        if record != self.record:
            self.record = record
            self.seen_since = now
        step = next_step(record, self.identity, self.seen_since, now)
        if step is Step.FOLLOW:
            self.renewed_at = None
            return
        try:
            if step is Step.CREATE:
                await self._create(now)
            else:
                assert record is not None
                await self._write(record, holder=self.identity, duration=None)
        except KubeError as exc:
            if exc.status == 409:  # another replica wrote first: it leads, we follow
                log.info("leader election: %s lost a race for the lease", self.identity)
                self.renewed_at = None
                return
            raise
        self.renewed_at = now

    async def _read(self) -> Record | None:
        name = self.spec.lease
        try:
            lease = await self.api.request(
                "GET",
                lease_path(self.namespace, name),
                verb="get",
                resource="leases",
                namespace=self.namespace,
                name=name,
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return _record(lease)

    async def _create(self, now: float) -> None:
        from lightkube.resources.coordination_v1 import Lease

        stamp = micro_time()
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.spec.lease, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.spec.lease_duration),
                "acquireTime": stamp,
                "renewTime": stamp,
                "leaseTransitions": 0,
            },
        }
        Lease.from_dict(body)
        lease = await self.api.request(
            "POST",
            lease_path(self.namespace),
            verb="create",
            resource="leases",
            namespace=self.namespace,
            body=body,
        )
        self.record = _record(lease)
        self.seen_since = now

    async def _write(self, record: Record, holder: str, duration: int | None) -> None:
        """PUT the Lease as read (its resourceVersion), with ``holder`` renewing it."""
        stamp = micro_time()
        taking_over = holder != record.holder
        spec: dict[str, Any] = {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration or int(self.spec.lease_duration),
            "renewTime": stamp,
            "leaseTransitions": record.transitions + (1 if taking_over and holder else 0),
        }
        if taking_over:
            spec["acquireTime"] = stamp
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.spec.lease,
                "namespace": self.namespace,
                "resourceVersion": record.version,
            },
            "spec": spec,
        }
        lease = await self.api.request(
            "PUT",
            lease_path(self.namespace, self.spec.lease),
            verb="update",
            resource="leases",
            namespace=self.namespace,
            name=self.spec.lease,
            body=body,
        )
        self.record = _record(lease)
        self.seen_since = asyncio.get_running_loop().time()
        if taking_over and holder:
            self.events.add("leader", "leader", f"{holder} took lease {self.spec.lease}")


def _record(lease: dict[str, Any]) -> Record:
    from lightkube.resources.coordination_v1 import Lease

    try:
        model: Any = Lease.from_dict(lease)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise KubeError(500, f"malformed Lease: {exc}", verb="get", resource="leases") from exc
    spec = model.spec
    meta = model.metadata
    return Record(
        holder=(spec.holderIdentity if spec is not None else None) or "",
        renew_time=str(lease.get("spec", {}).get("renewTime") or ""),
        duration=float((spec.leaseDurationSeconds if spec is not None else None) or 15),
        transitions=int((spec.leaseTransitions if spec is not None else None) or 0),
        version=str((meta.resourceVersion if meta is not None else None) or ""),
    )
