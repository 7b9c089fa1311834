"""An upstream that follows a Kubernetes Service's EndpointSlices.

Theory of operation (the list-then-watch of client-go's reflector, for one label selector,
``kubernetes.io/service-name=<service>``, so only this Service's slices are ever read):

1. **list** the slices; the list *replaces* what we knew (a slice deleted while we were not
   watching is gone from it: nothing missed stays), and its ``resourceVersion`` is where
   the watch starts;
2. **watch** from that resourceVersion with bookmarks: ADDED and MODIFIED store the slice,
   DELETED forgets it, BOOKMARK only moves the resourceVersion (so a re-watch after a quiet
   hour does not start from a version the server has compacted away);
3. the server ends a watch after ``timeoutSeconds``: **re-watch** from the last
   resourceVersion seen; every event after it is delivered, none lost;
4. **410 Gone** (the version is too old): back to 1 at once;
5. any other error (the stream dropped mid-way, 500, 429, 403, unreachable): keep the
   endpoints as they are, wait (the server's Retry-After, else a back-off doubling to
   ``BACKOFF_MAX``), back to 1. A re-list costs one request and proves the state whole,
   where a re-watch would trust that nothing was compacted meanwhile.

After every change the slices are turned into rows (``runtime.slices``, pure: conditions,
ports, families) and applied with ``membership.sync``, which keeps Endpoint objects by
address, so a re-list that finds the same pods changes nothing for traffic: no endpoint is
duplicated or briefly dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from portico.config.kube import KubeEndpoints
from portico.control.kubeapi import KubeApi, KubeError
from portico.runtime import membership
from portico.runtime.events import EventLog
from portico.runtime.membership import EndpointRow
from portico.runtime.slices import endpoint_rows
from portico.runtime.snapshot import Service

log = logging.getLogger("portico.kubernetes")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
LIST_LIMIT = "500"  # slices per list page (a Service has one per 100 endpoints)
QUICK_END = 1.0  # seconds: a watch the server ends sooner than this is re-opened after a pause


def slices_path(namespace: str) -> str:
    return f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"


class Backoff:
    """Doubling delays with jitter (so replicas do not retry in step), reset on success."""

    __slots__ = ("delay",)

    def __init__(self) -> None:
        self.delay = BACKOFF_MIN

    def next(self, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(BACKOFF_MAX, max(0.0, retry_after))
        delay = self.delay * random.uniform(0.8, 1.2)
        self.delay = min(BACKOFF_MAX, self.delay * 2)
        return delay

    def reset(self) -> None:
        self.delay = BACKOFF_MIN


class SliceWatch:
    """Keeps one upstream's endpoints equal to its Service's ready pods."""

    def __init__(
        self,
        name: str,
        spec: KubeEndpoints,
        api: KubeApi,
        service_of: Callable[[], Service],
        events: EventLog,
    ) -> None:
        self.name = name
        self.spec = spec
        self.api = api
        self.service_of = service_of
        self.events = events
        self.namespace = ""
        self.slices: dict[str, dict[str, Any]] = {}
        self.version = ""
        self.rows: list[EndpointRow] = []
        self.problem: str | None = None  # the last error, until the next success
        self.lists = 0  # how many times the slices were listed (re-lists after 410 count)
        self.on_change: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<SliceWatch {self.name} service={self.spec.service} v={self.version}>"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"endpointslices {self.name}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        return {
            "service": f"{self.namespace}/{self.spec.service}",
            "endpoints": [f"{h}:{p}" + (" (draining)" if d else "") for h, p, d in self.rows],
            "resource_version": self.version,
            "problem": self.problem,
        }

    # --- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                self.api.open()
                self.namespace = self.spec.namespace or self.api.namespace
                await self._list()
                backoff.reset()
                loop = asyncio.get_running_loop()
                while True:
                    began = loop.time()
                    await self._watch()  # ended by the server: re-watch from self.version
                    if loop.time() - began < QUICK_END:
                        # A server (or a proxy before it) ending watches at once would
                        # otherwise have us re-watch in a tight loop.
                        await asyncio.sleep(backoff.next())
            except KubeError as exc:
                if exc.gone:
                    log.info("endpointslices %s: 410 Gone, listing again", self.name)
                    continue
                delay = backoff.next(exc.retry_after)
                self._report(exc.explain(), delay)
                await asyncio.sleep(delay)

    def _report(self, message: str, delay: float) -> None:
        if message != self.problem:
            self.events.add(self.name, "kubernetes", message)
        self.problem = message
        log.warning(
            "endpointslices %s: %s; keeping %d endpoint(s), retrying in %.1fs",
            self.name,
            message,
            len(self.rows),
            delay,
        )

    async def _list(self) -> None:
        params = {
            "labelSelector": f"kubernetes.io/service-name={self.spec.service}",
            "limit": LIST_LIMIT,
        }
        found: dict[str, dict[str, Any]] = {}
        version = ""
        while True:
            page = await self.api.request(
                "GET",
                slices_path(self.namespace),
                verb="list",
                resource="endpointslices",
                namespace=self.namespace,
                params=params,
            )
            for item in page.get("items") or ():
                if self._readable(item):
                    found[_key(item)] = item
            meta = page.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            cont = meta.get("continue")
            if not cont:
                break
            params = {**params, "continue": str(cont)}
        self.slices = found
        self.version = version
        self.lists += 1
        if self.problem is not None:
            self.events.add(self.name, "kubernetes", f"endpointslices of {self.name} recovered")
            log.info("endpointslices %s: recovered", self.name)
        self.problem = None
        self._apply()

    async def _watch(self) -> None:
        params = {"labelSelector": f"kubernetes.io/service-name={self.spec.service}"}
        if self.version:
            params["resourceVersion"] = self.version
        async for event in self.api.watch(
            slices_path(self.namespace),
            params,
            resource="endpointslices",
            namespace=self.namespace,
        ):
            kind = event.get("type")
            obj = event.get("object") or {}
            version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
            if kind in ("ADDED", "MODIFIED"):
                if self._readable(obj):
                    self.slices[_key(obj)] = obj
                else:
                    self.slices.pop(_key(obj), None)
            elif kind == "DELETED":
                self.slices.pop(_key(obj), None)
            if version:
                self.version = version
            if kind != "BOOKMARK":
                self._apply()

    def _readable(self, obj: dict[str, Any]) -> bool:
        """Whether lightkube's model reads the slice; one it cannot is left out, and said."""
        from lightkube.resources.discovery_v1 import EndpointSlice

        try:
            EndpointSlice.from_dict(obj)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            log.warning("endpointslices %s: slice %s left out: %s", self.name, _key(obj), exc)
            return False
        return True

    def _apply(self) -> None:
        service = self.service_of()
        known = {ep.address for ep in service.endpoints}
        rows, problems = endpoint_rows(self.slices.values(), self.spec.port, known)
        for problem in problems:
            log.warning("endpointslices %s: %s", self.name, problem)
        if rows == self.rows and rows == membership.rows(service):
            return
        before = {(h, p): d for h, p, d in self.rows}
        self.rows = rows
        loop = asyncio.get_running_loop()
        membership.sync(service, rows, loop.time())
        for host, port, draining in rows:
            was = before.pop((host, port), None)
            if was is None or was != draining:
                kind = "drain" if draining else "ready"
                self.events.add(self.name, kind, f"{host}:{port} {kind}")
        for host, port in before:
            self.events.add(self.name, "stop", f"{host}:{port} left")
        log.info(
            "endpointslices %s: %d ready, %d draining",
            self.name,
            sum(1 for r in rows if not r[2]),
            sum(1 for r in rows if r[2]),
        )
        if self.on_change is not None:
            self.on_change()


def _key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return str(meta.get("uid") or meta.get("name") or "")
