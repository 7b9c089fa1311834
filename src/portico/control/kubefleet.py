"""An app whose instances are the pods of a Kubernetes Deployment.

Theory of operation. Kubernetes already runs the per-instance loop (the ReplicaSet replaces
crashed pods, a rollout surges and drains), so this is not a provider behind the supervisor
but a *fleet* beside it (``control.fleet``): Portico decides the count, Kubernetes runs the
pods, Portico follows what is ready.

* **ensure**: the Deployment is read; when missing and the config has a pod ``template``, it
  is created with ``replicas = min`` (labels of the template as its selector); otherwise
  the missing Deployment is reported and asked again after a back-off;
* **count**: ``desired`` is written to the scale subresource (``PATCH .../scale``,
  ``spec.replicas``) by the leader only; every replica reads it back every
  ``FOLLOW_EVERY`` so a follower knows the count (and a leader sees a `kubectl scale`);
* **endpoints**: a ``SliceWatch`` on the Deployment's Service, as for any upstream;
* **cold start**: with ``min = 0`` and no replica, a request calls ``demand``: replicas 0
  -> 1, the request held until an endpoint turns ready (any Portico replica may do this
  one write: it only ever raises 0 to 1);
* **rolling restart**: the pod template's ``kubectl.kubernetes.io/restartedAt`` annotation
  is patched, as `kubectl rollout restart` does; the Deployment's strategy rolls the pods;
* **CPU**: ``metrics.k8s.io`` PodMetrics of the Deployment's pods (metrics-server), in % of
  one core per pod like a local instance's; without the metrics API the signal is None and
  the autoscaler makes no CPU decision.

Stopping Portico changes nothing in the cluster: the Deployment keeps its replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable
from typing import Any

from portico.config.kube import KubeDeployment
from portico.config.model import App
from portico.control.kubeapi import KubeApi, KubeError
from portico.control.kubewatch import Backoff, SliceWatch
from portico.runtime.events import EventLog
from portico.runtime.snapshot import Service

log = logging.getLogger("portico.kubernetes")

FOLLOW_EVERY = 2.0  # seconds between reads of the scale subresource
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


def deployment_path(namespace: str, name: str = "") -> str:
    base = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    return f"{base}/{name}" if name else base


def parse_cpu(quantity: str) -> float:
    """A CPU quantity ('250m', '1', '12345678n', '5u') in cores."""
    units = {"n": 1e-9, "u": 1e-6, "m": 1e-3}
    if quantity and quantity[-1] in units:
        return float(quantity[:-1]) * units[quantity[-1]]
    return float(quantity)


class DeploymentFleet:
    def __init__(
        self,
        name: str,
        spec: App,
        api: KubeApi,
        service_of: Callable[[], Service],
        events: EventLog,
    ) -> None:
        assert spec.kubernetes is not None
        self.name = name
        self.spec = spec
        self.kube: KubeDeployment = spec.kubernetes
        self.api = api
        self.service_of = service_of
        self.events = events
        self.namespace = ""
        self.desired = spec.min
        self.replicas: int | None = None  # as last read from (or written to) the API
        self.selector = ""
        self.problem: str | None = None
        self.cpu: float | None = None
        self.leading: Callable[[], bool] = lambda: True
        self.watch = SliceWatch(name, self.kube.endpoints(), api, service_of, events)
        self._wake = asyncio.Event()
        self._demanded = False  # a cold start asked for before the first read
        self._no_metrics = False
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<DeploymentFleet {self.name} replicas={self.replicas} desired={self.desired}>"

    # --- what others call ---------------------------------------------------------------

    def start(self) -> None:
        self.service_of().demand = self.demand
        self.watch.start()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"deployment {self.name}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.watch.stop()

    def set_desired(self, n: int) -> None:
        n = max(self.spec.min, min(self.spec.max, n))
        if n != self.desired:
            self.desired = n
            self._wake.set()

    def demand(self) -> None:
        if self.desired == 0 or self.replicas == 0:
            self.events.add(self.name, "scale", f"scale {self.name} 0 -> 1: cold start")
            log.info("scale %s 0 -> 1: cold start on the first request", self.name)
            self.desired = max(1, self.desired)
            self._demanded = True
            self._wake.set()

    def ready_count(self) -> int:
        return sum(1 for ep in self.service_of().endpoints if ep.available)

    def counted_count(self) -> int:
        return self.desired if self.replicas is None else self.replicas

    def cpu_percent(self) -> float | None:
        return self.cpu

    async def rolling_restart(self) -> None:
        if not self.leading():
            log.info("rolling restart of %s: not the leader, left to it", self.name)
            return
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
        try:
            await self._patch_deployment(patch)
        except KubeError as exc:
            self._report(exc.explain())
            return
        said = f"rollout restart of deployment {self.kube.deployment}"
        self.events.add(self.name, "restart", said)
        log.info("rolling restart of %s: template annotated %s=%s", self.name, RESTARTED_AT, now)

    def status(self) -> dict[str, Any]:
        return {
            "deployment": f"{self.namespace}/{self.kube.deployment}",
            "replicas": self.replicas,
            "desired": self.desired,
            "cpu_percent": self.cpu,
            "problem": self.problem,
            "endpoints": self.watch.status(),
        }

    # --- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                self.api.open()
                self.namespace = self.kube.namespace or self.api.namespace
                if not self.selector:
                    await self._ensure()
                await self._follow()
                if self.spec.autoscale is not None and self.spec.autoscale.metric == "cpu":
                    await self._read_cpu()
                backoff.reset()
                if self.problem is not None:
                    self.events.add(self.name, "kubernetes", f"deployment {self.name} recovered")
                    self.problem = None
            except KubeError as exc:
                self._report(exc.explain())
                await asyncio.sleep(backoff.next(exc.retry_after))
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FOLLOW_EVERY)

    def _report(self, message: str) -> None:
        if message != self.problem:
            self.events.add(self.name, "kubernetes", message)
            log.warning("deployment %s: %s", self.name, message)
        self.problem = message

    async def _ensure(self) -> None:
        name = self.kube.deployment
        try:
            found = await self.api.request(
                "GET",
                deployment_path(self.namespace, name),
                verb="get",
                resource="deployments",
                namespace=self.namespace,
                name=name,
            )
        except KubeError as exc:
            if exc.status != 404 or self.kube.template is None:
                raise
            try:
                found = await self._create()
            except KubeError as race:
                if race.status != 409:  # 409: another Portico created it first: read it
                    raise
                found = await self.api.request(
                    "GET",
                    deployment_path(self.namespace, name),
                    verb="get",
                    resource="deployments",
                    namespace=self.namespace,
                    name=name,
                )
        labels = ((found.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        self.selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))

    async def _create(self) -> dict[str, Any]:
        from lightkube.resources.apps_v1 import Deployment

        template = self.kube.template
        assert template is not None
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": self.kube.deployment,
                "labels": {"app.kubernetes.io/managed-by": "portico"},
            },
            "spec": {
                "replicas": self.spec.min,
                "selector": {"matchLabels": dict(template["metadata"]["labels"])},
                "template": template,
            },
        }
        try:  # the model refuses a malformed template before the API does
            Deployment.from_dict(body)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise KubeError(
                422,
                f"app.kubernetes.template is not a pod template: {exc}",
                verb="create",
                resource="deployments",
                namespace=self.namespace,
                name=self.kube.deployment,
            ) from exc
        created = await self.api.request(
            "POST",
            deployment_path(self.namespace),
            verb="create",
            resource="deployments",
            namespace=self.namespace,
            body=body,
        )
        self.events.add(self.name, "scale", f"created deployment {self.kube.deployment}")
        log.info("deployment %s: created from the config's template", self.kube.deployment)
        return created

    async def _follow(self) -> None:
        """Read the scale; the leader then writes ``desired`` if it differs."""
        name = self.kube.deployment
        path = deployment_path(self.namespace, name) + "/scale"
        where: dict[str, Any] = {
            "resource": "deployments/scale",
            "namespace": self.namespace,
            "name": name,
        }
        scale = await self.api.request("GET", path, verb="get", **where)
        replicas = int((scale.get("spec") or {}).get("replicas") or 0)
        first = self.replicas is None
        self.replicas = replicas
        if first:
            # Adopt the running count, within the app's bounds (a Portico restart must not
            # reset a scaled-up Deployment to min).
            self.desired = max(self.spec.min, min(self.spec.max, replicas))
            if self._demanded:
                self.desired = max(1, self.desired)
        wants_cold_start = self.desired > 0 and replicas == 0
        if not self.leading() and not wants_cold_start:
            self.desired = replicas
            return
        if self.desired == replicas:
            return
        body = {"spec": {"replicas": self.desired}}
        await self.api.request(
            "PATCH",
            path,
            verb="patch",
            body=body,
            content_type="application/merge-patch+json",
            **where,
        )
        log.info("deployment %s: replicas %d -> %d", name, replicas, self.desired)
        said = f"deployment {name} replicas {replicas} -> {self.desired}"
        self.events.add(self.name, "scale", said)
        self.replicas = self.desired

    async def _patch_deployment(self, patch: dict[str, Any]) -> None:
        name = self.kube.deployment
        await self.api.request(
            "PATCH",
            deployment_path(self.namespace, name),
            verb="patch",
            resource="deployments",
            namespace=self.namespace,
            name=name,
            body=patch,
            content_type="application/strategic-merge-patch+json",
        )

    async def _read_cpu(self) -> None:
        path = f"/apis/metrics.k8s.io/v1beta1/namespaces/{self.namespace}/pods"
        try:
            found = await self.api.request(
                "GET",
                path,
                verb="list",
                resource="pods",
                namespace=self.namespace,
                params={"labelSelector": self.selector},
            )
        except KubeError as exc:
            if exc.status in (404, 503):
                if not self._no_metrics:  # said once, until the API is back
                    self._no_metrics = True
                    message = "no metrics API (metrics.k8s.io): no CPU signal"
                    self.events.add(self.name, "kubernetes", message)
                    log.warning("deployment %s: %s", self.name, message)
                self.cpu = None
                return
            raise
        self._no_metrics = False
        per_pod = [
            sum(parse_cpu(str((c.get("usage") or {}).get("cpu") or "0")) for c in containers)
            for containers in (item.get("containers") or () for item in found.get("items") or ())
        ]
        self.cpu = 100.0 * sum(per_pod) / len(per_pod) if per_pod else None
