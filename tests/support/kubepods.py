"""``FakeCluster``: the controllers behind ``FakeKubeApi``, and real pods.

A Deployment's replicas are followed as the ReplicaSet and EndpointSlice controllers do:
a new pod is a real HTTP server on its own loopback address (127.0.0.N, all pods on the
same port, as pods are), listed in the Service's EndpointSlice not ready first and ready
once it listens; a pod going away is listed ``terminating`` (serving, not ready) for
``grace`` seconds while it still answers, then leaves the slice and closes. A change of
the pod template rolls the pods one at a time (maxSurge 1, maxUnavailable 0), the way
`kubectl rollout restart` makes them roll.

A pod answers every request with its name; ``/slow?ms=N`` answers after N ms.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from lightkube.models.apps_v1 import DeploymentSpec
from lightkube.models.core_v1 import (
    Container,
    ContainerPort,
    ObjectReference,
    PodSpec,
    PodTemplateSpec,
)
from lightkube.models.discovery_v1 import Endpoint, EndpointConditions, EndpointPort
from lightkube.models.meta_v1 import LabelSelector, ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.discovery_v1 import EndpointSlice

from tests.support.kubeapi import FakeKubeApi
from tests.support.ports import free_port

TICK = 0.05  # seconds between controller passes


@dataclass
class Pod:
    name: str
    ip: str
    template: str  # hash of the pod template it was made from
    phase: str = "starting"  # starting | ready | terminating
    server: asyncio.AbstractServer | None = None
    requests: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    in_flight: int = 0
    ends_at: float = 0.0


@dataclass
class Managed:
    deployment: str
    service: str
    namespace: str
    pods: list[Pod] = field(default_factory=list)


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


class FakeCluster:
    def __init__(self, api: FakeKubeApi, grace: float = 1.0, start_delay: float = 0.1) -> None:
        self.api = api
        self.grace = grace
        self.start_delay = start_delay
        self.port = free_port()
        self.omit_ready = False  # leave conditions.ready unset for ready pods (nil = ready)
        self.managed: dict[str, Managed] = {}
        self._ips = (f"127.0.0.{n}" for n in itertools.count(10))
        self._names = itertools.count(1)
        self._task: asyncio.Task[None] | None = None

    # --- from the test's thread ---------------------------------------------------------

    def start(self) -> FakeCluster:
        async def begin() -> None:
            self._task = asyncio.get_running_loop().create_task(self._run())

        self.api.call(begin())
        return self

    def stop(self) -> None:
        async def end() -> None:
            if self._task is not None:
                self._task.cancel()
            for m in self.managed.values():
                for pod in m.pods:
                    self._kill(pod)

        self.api.call(end())

    def add_deployment(
        self,
        name: str,
        replicas: int = 1,
        service: str | None = None,
        namespace: str = "default",
        create_object: bool = True,
    ) -> None:
        """A Deployment (unless the test lets Portico create it) and its Service's slice."""

        def add() -> None:
            self.managed[name] = Managed(name, service or name, namespace)
            if create_object:
                labels = {"app": name}
                obj = Deployment(
                    apiVersion="apps/v1",
                    kind="Deployment",
                    metadata=ObjectMeta(name=name, namespace=namespace, generation=1),
                    spec=DeploymentSpec(
                        replicas=replicas,
                        selector=LabelSelector(matchLabels=labels),
                        template=PodTemplateSpec(
                            metadata=ObjectMeta(labels=labels),
                            spec=PodSpec(
                                containers=[
                                    Container(
                                        name="web",
                                        image="app:1",
                                        ports=[ContainerPort(containerPort=self.port, name="http")],
                                    )
                                ]
                            ),
                        ),
                    ),
                ).to_dict()
                self.api.put("deployments", obj)
            self._publish(self.managed[name])

        self.api.run(add)

    def pods(self, deployment: str) -> list[tuple[str, str, str]]:
        """(name, ip, phase) of every pod, from the test's thread."""
        return self.api.run(
            lambda: [(p.name, p.ip, p.phase) for p in self.managed[deployment].pods]
        )

    def requests(self, deployment: str) -> dict[str, int]:
        return self.api.run(lambda: {p.name: p.requests for p in self.managed[deployment].pods})

    # --- the controllers ----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            for managed in list(self.managed.values()):
                await self._reconcile(managed)
            await asyncio.sleep(TICK)

    async def _reconcile(self, m: Managed) -> None:
        loop = asyncio.get_running_loop()
        obj = self.api.get("deployments", m.namespace, m.deployment)
        changed = False
        for pod in [p for p in m.pods if p.phase == "terminating" and loop.time() >= p.ends_at]:
            m.pods.remove(pod)
            self._kill(pod)
            changed = True
        if obj is None:
            if changed:
                self._publish(m)
            return
        desired = int(obj["spec"].get("replicas", 1))
        current = template_hash(obj["spec"]["template"])
        live = [p for p in m.pods if p.phase != "terminating"]
        new = [p for p in live if p.template == current]
        old = [p for p in live if p.template != current]
        for pod in [p for p in live if p.phase == "starting" and p.server is None]:
            await self._listen(pod)
            changed = True
        if old:  # rolling, maxSurge 1, maxUnavailable 0: an old pod goes only while the
            # ready pods outnumber the replicas asked for
            if len(new) < desired and len(live) < desired + 1:
                m.pods.append(self._new_pod(current))
                changed = True
            if sum(1 for p in live if p.phase == "ready") > desired or not desired:
                self._terminate(old[0], loop.time())
                changed = True
        elif len(live) < desired:
            m.pods.append(self._new_pod(current))
            changed = True
        elif len(live) > desired:
            victim = sorted(live, key=lambda p: (p.phase == "ready", -int(p.name.split("-")[-1])))[
                0
            ]
            self._terminate(victim, loop.time())
            changed = True
        for pod in live:
            if pod.phase == "starting" and pod.server is not None and loop.time() >= pod.ends_at:
                pod.phase = "ready"
                changed = True
        if changed:
            self._publish(m)
            ready = sum(1 for p in m.pods if p.phase == "ready")
            status = {
                "replicas": len(live),
                "readyReplicas": ready,
                "observedGeneration": obj["metadata"].get("generation", 1),
            }
            if obj.get("status") != status:
                obj = dict(obj)
                obj["status"] = status
                self.api.put("deployments", obj)

    @staticmethod
    def _kill(pod: Pod) -> None:
        """The pod is gone: its listener and every connection to it."""
        if pod.server is not None:
            pod.server.close()
        for writer in list(pod.writers):
            writer.transport.abort()

    def _new_pod(self, template: str) -> Pod:
        return Pod(f"pod-{next(self._names)}", next(self._ips), template)

    def _terminate(self, pod: Pod, now: float) -> None:
        pod.phase = "terminating"
        pod.ends_at = now + self.grace

    async def _listen(self, pod: Pod) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            pod.writers.add(writer)
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    target = head.split(b" ", 2)[1].decode()
                    pod.requests += 1
                    pod.in_flight += 1
                    url = urllib.parse.urlsplit(target)
                    ms = dict(urllib.parse.parse_qsl(url.query)).get("ms")
                    if url.path == "/slow" and ms:
                        await asyncio.sleep(int(ms) / 1000)
                    body = pod.name.encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    pod.in_flight -= 1
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                pod.writers.discard(writer)
                writer.close()

        pod.server = await asyncio.start_server(serve, pod.ip, self.port)
        pod.ends_at = asyncio.get_running_loop().time() + self.start_delay

    def _publish(self, m: Managed) -> None:
        """The Service's EndpointSlice, as the EndpointSlice controller writes it."""
        endpoints = []
        for pod in m.pods:
            if pod.server is None:
                conditions = EndpointConditions(ready=False, serving=False, terminating=False)
            elif pod.phase == "ready":
                conditions = (
                    EndpointConditions(serving=True, terminating=False)
                    if self.omit_ready
                    else EndpointConditions(ready=True, serving=True, terminating=False)
                )
            elif pod.phase == "terminating":
                conditions = EndpointConditions(ready=False, serving=True, terminating=True)
            else:
                conditions = EndpointConditions(ready=False, serving=False, terminating=False)
            endpoints.append(
                Endpoint(
                    addresses=[pod.ip],
                    conditions=conditions,
                    targetRef=ObjectReference(
                        kind="Pod", name=pod.name, namespace=m.namespace, uid=f"uid-{pod.name}"
                    ),
                )
            )
        obj = EndpointSlice(
            apiVersion="discovery.k8s.io/v1",
            kind="EndpointSlice",
            addressType="IPv4",
            metadata=ObjectMeta(
                name=f"{m.service}-x7k2p",
                namespace=m.namespace,
                labels={
                    "kubernetes.io/service-name": m.service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            ),
            endpoints=endpoints,
            ports=[EndpointPort(name="http", port=self.port, protocol="TCP")],
        ).to_dict()
        self.api.put("endpointslices", obj)
