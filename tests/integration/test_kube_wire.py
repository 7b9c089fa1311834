"""The fake Kubernetes API on the wire: one recorded transcript per operation Portico uses
(tests/data/k8s/*.json), and Portico's own client code (KubeApi, SliceWatch's decoding,
LeaderElector) against it in-process, over a real socket.

The transcripts are the reviewable record of what the fake says: request (method, path,
query, body) and answer (status, Retry-After, JSON body or the watch's events), compared
with the API reference (EndpointSlice and Lease: kubernetes.io API reference; Scale:
autoscaling/v1; Status: meta/v1; watch events: "Efficient detection of changes" in the API
concepts). A change to the fake that alters a shape fails here. To record them again after
a deliberate change: ``PORTICO_RECORD_K8S=1 pytest tests/integration/test_kube_wire.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightkube.models.discovery_v1 import Endpoint, EndpointConditions, EndpointPort
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.discovery_v1 import EndpointSlice

from portico.config.kube import Kubernetes, LeaderElection
from portico.config.model import Config
from portico.control.kubeapi import KubeApi, KubeError
from portico.control.leader import LeaderElector
from portico.control.orchestrator import Orchestrator
from portico.runtime.events import EventLog
from portico.runtime.snapshot import compile_config
from tests.support.kubeapi import TOKEN, Exchange, FakeKubeApi

DATA = Path(__file__).parent.parent / "data" / "k8s"
RECORD = os.environ.get("PORTICO_RECORD_K8S") == "1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLICES = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
DEPLOY = "/apis/apps/v1/namespaces/default/deployments"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/default/leases"


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi()
    api.bookmark_every = 0.2
    api.start()
    try:
        yield api
    finally:
        api.stop()


def a_slice(name: str, *ips: str, ready: bool | None = True) -> dict[str, Any]:
    return EndpointSlice(
        apiVersion="discovery.k8s.io/v1",
        kind="EndpointSlice",
        addressType="IPv4",
        metadata=ObjectMeta(
            name=name, namespace="default", labels={"kubernetes.io/service-name": "web"}
        ),
        endpoints=[
            Endpoint(addresses=[ip], conditions=EndpointConditions(ready=ready)) for ip in ips
        ],
        ports=[EndpointPort(name="http", port=8080, protocol="TCP")],
    ).to_dict()


def a_deployment(name: str = "web", replicas: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "web", "image": "app:1"}]},
            },
        },
    }


def recorded(exchange: Exchange, headers: dict[str, str] | None = None) -> dict[str, Any]:
    streamed = exchange.answer is exchange.events
    response: dict[str, Any] = {"status": exchange.status}
    if headers:
        response["headers"] = headers
    response["events" if streamed else "body"] = exchange.answer
    return {
        "request": {
            "method": exchange.method,
            "path": exchange.path,
            "query": exchange.query,
            "body": exchange.body,
        },
        "response": response,
    }


def check(name: str, transcript: dict[str, Any]) -> None:
    path = DATA / f"{name}.json"
    if RECORD:
        DATA.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(transcript, indent=2, sort_keys=True) + "\n")
    assert json.loads(path.read_text()) == json.loads(json.dumps(transcript)), name


def put(kube: FakeKubeApi, resource: str, obj: dict[str, Any]) -> None:
    kube.run(lambda: kube.put(resource, obj))


def test_transcripts_of_every_operation(kube: FakeKubeApi) -> None:
    put(kube, "endpointslices", a_slice("web-a1b2c", "10.0.0.1", "10.0.0.2"))
    put(kube, "endpointslices", a_slice("web-d3e4f", "10.0.0.3", ready=None))
    put(kube, "deployments", a_deployment())
    c = httpx.Client(base_url=kube.url, headers=AUTH, trust_env=False, timeout=10)
    selector = {"labelSelector": "kubernetes.io/service-name=web"}

    c.get(SLICES, params={**selector, "limit": "1"})
    check("list_endpointslices_page", recorded(kube.transcript[-1]))

    with c.stream(
        "GET",
        SLICES,
        params={
            **selector,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": "101",
        },
    ) as stream:
        lines = stream.iter_lines()
        assert json.loads(next(lines))["type"] == "ADDED"  # the history after 101: web-d3e4f
        put(kube, "endpointslices", a_slice("web-d3e4f", "10.0.0.3", "10.0.0.4"))
        assert json.loads(next(lines))["type"] == "MODIFIED"
        kube.run(lambda: kube.delete("endpointslices", "default", "web-a1b2c"))
        assert json.loads(next(lines))["type"] == "DELETED"
        assert json.loads(next(lines))["type"] == "BOOKMARK"
    check("watch_endpointslices", recorded(kube.transcript[-1]))

    kube.expire_watches()  # the history is compacted: version 105 is too old now
    params = {**selector, "watch": "true", "resourceVersion": "105"}
    with c.stream("GET", SLICES, params=params) as s:
        assert json.loads(next(s.iter_lines()))["type"] == "ERROR"
    check("watch_410_gone", recorded(kube.transcript[-1]))

    c.get(f"{DEPLOY}/web/scale")
    check("get_scale", recorded(kube.transcript[-1]))
    c.patch(
        f"{DEPLOY}/web/scale",
        content=b'{"spec":{"replicas":5}}',
        headers={"Content-Type": "application/merge-patch+json"},
    )
    check("patch_scale", recorded(kube.transcript[-1]))
    restart = {
        "spec": {
            "template": {
                "metadata": {
                    "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"}
                }
            }
        }
    }
    c.patch(
        f"{DEPLOY}/web",
        content=json.dumps(restart).encode(),
        headers={"Content-Type": "application/strategic-merge-patch+json"},
    )
    check("patch_rollout_restart", recorded(kube.transcript[-1]))
    c.post(DEPLOY, json=a_deployment("api", 1))
    check("create_deployment", recorded(kube.transcript[-1]))
    c.get(f"{DEPLOY}/ghost")
    check("get_deployment_not_found", recorded(kube.transcript[-1]))

    c.get(f"{LEASES}/portico")
    check("get_lease_not_found", recorded(kube.transcript[-1]))
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "portico", "namespace": "default"},
        "spec": {
            "holderIdentity": "p1",
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-01-01T00:00:00.000000Z",
            "renewTime": "2026-01-01T00:00:00.000000Z",
            "leaseTransitions": 0,
        },
    }
    c.post(LEASES, json=lease)
    check("create_lease", recorded(kube.transcript[-1]))
    version = kube.transcript[-1].answer["metadata"]["resourceVersion"]
    renewed = json.loads(json.dumps(lease))
    renewed["metadata"]["resourceVersion"] = version
    renewed["spec"]["renewTime"] = "2026-01-01T00:00:05.000000Z"
    c.put(f"{LEASES}/portico", json=renewed)
    check("update_lease", recorded(kube.transcript[-1]))
    renewed["spec"]["holderIdentity"] = "p2"  # a second writer, with the version it had read
    c.put(f"{LEASES}/portico", json=renewed)
    check("update_lease_conflict", recorded(kube.transcript[-1]))

    kube.forbid("patch", "deployments/scale")
    c.patch(
        f"{DEPLOY}/web/scale",
        content=b'{"spec":{"replicas":1}}',
        headers={"Content-Type": "application/merge-patch+json"},
    )
    check("patch_scale_forbidden", recorded(kube.transcript[-1]))
    kube.fail(SLICES, 429, retry_after=2)
    r = c.get(SLICES, params=selector)
    check("list_429", recorded(kube.transcript[-1], {"Retry-After": r.headers["Retry-After"]}))
    c.get(
        "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods", params={"labelSelector": "app=web"}
    )
    check("pod_metrics_unavailable", recorded(kube.transcript[-1]))
    c.close()


# --- Portico's client code, in-process ---------------------------------------------------------


def settings(kube: FakeKubeApi, tmp_path: Path) -> Kubernetes:
    return Kubernetes(kubeconfig=str(kube.kubeconfig(tmp_path)))


def test_kubeapi_reports_what_is_missing(kube: FakeKubeApi, tmp_path: Path) -> None:
    async def go() -> None:
        api = KubeApi(settings(kube, tmp_path))
        kube.forbid("list", "endpointslices")
        with pytest.raises(KubeError) as info:
            await api.request(
                "GET", SLICES, verb="list", resource="endpointslices", namespace="default"
            )
        assert info.value.status == 403
        assert "cannot list endpointslices in namespace default" in info.value.explain()
        assert 'cannot list resource "endpointslices"' in info.value.explain()  # the API's words
        kube.fail(SLICES, 429, retry_after=3)
        kube.forbid("list", "endpointslices", allowed=True)
        with pytest.raises(KubeError) as info:
            await api.request("GET", SLICES, verb="list", resource="endpointslices")
        assert info.value.retry_after == 3.0
        await api.close()
        wrong = KubeApi(Kubernetes(kubeconfig=str(kube.kubeconfig(tmp_path, token="stale"))))
        with pytest.raises(KubeError) as info:
            await wrong.request("GET", SLICES, verb="list", resource="endpointslices")
        assert info.value.explain().startswith("unauthorized")
        await wrong.close()

    asyncio.run(go())


def test_no_service_account_and_no_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeError) as info:
        KubeApi(Kubernetes()).open()
    said = str(info.value)
    assert "no service account token at /var/run/secrets/kubernetes.io/serviceaccount" in said
    assert f"no kubeconfig at {tmp_path / 'absent'}" in said


def test_election_conflict_takeover_and_status(kube: FakeKubeApi, tmp_path: Path) -> None:
    spec = {"lease_duration": 1.0, "renew_every": 0.2}

    async def go() -> None:
        api = KubeApi(settings(kube, tmp_path))
        one = LeaderElector(LeaderElection(identity="p1", **spec), api, EventLog())
        two = LeaderElector(LeaderElection(identity="p2", **spec), api, EventLog())
        one.start()
        await wait(lambda: one.is_leader())
        two.start()
        await asyncio.sleep(0.6)
        assert not two.is_leader()
        assert two.status() == {
            "leader": False,
            "identity": "p2",
            "holder": "p1",
            "renewed": two.status()["renewed"],
            "lease": "default/portico",
            "transitions": 0,
            "problem": None,
        }
        # A stale write (the version p2 read before p1's last renewal) is refused: 409.
        stale = two.record
        assert stale is not None
        await wait(lambda: one.record is not None and one.record.version != stale.version)
        with pytest.raises(KubeError) as info:
            await two._write(stale, holder="p2", duration=None)
        assert info.value.status == 409
        # p1 dies without releasing: p2 takes over once the lease has not moved for 1 s.
        assert one._task is not None
        one._task.cancel()
        died = time.monotonic()
        await wait(lambda: two.is_leader(), 3.0)
        assert 1.0 <= time.monotonic() - died <= 1.0 + 0.2 + 0.5
        assert two.status()["holder"] == "p2" and two.status()["transitions"] == 1
        await two.stop()  # releases
        lease = kube.run(lambda: kube.get("leases", "default", "portico"))
        assert lease is not None and lease["spec"]["holderIdentity"] == ""
        await api.close()

    asyncio.run(go())


async def wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_orchestrator_status_for_the_admin_api(kube: FakeKubeApi, tmp_path: Path) -> None:
    """``Orchestrator.kubernetes_status()``: what the admin API shows, JSON as it is."""
    put(kube, "endpointslices", a_slice("web-a1b2c", "10.0.0.1", "10.0.0.2"))
    config = Config.model_validate(
        {
            "kubernetes": {
                "kubeconfig": str(kube.kubeconfig(tmp_path)),
                "leader_election": {"identity": "me", "lease_duration": 2, "renew_every": 0.2},
            },
            "upstreams": {"web": {"kubernetes": {"service": "web", "port": "http"}}},
        }
    )
    snapshot = compile_config(config, None)

    async def go() -> dict[str, Any]:
        orchestrator = Orchestrator(config, lambda: snapshot)
        orchestrator.start()
        try:
            await wait(lambda: orchestrator.kubernetes_status()["leader"]["leader"])
            await wait(lambda: len(snapshot.services["web"].endpoints) == 2)
            return json.loads(json.dumps(orchestrator.kubernetes_status()))
        finally:
            await orchestrator.stop()

    status = asyncio.run(go())
    assert status["leader"]["leader"] is True
    assert status["leader"]["holder"] == "me"
    assert status["leader"]["lease"] == "default/portico"
    assert status["services"]["web"]["endpoints"] == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert status["services"]["web"]["problem"] is None
    assert status["deployments"] == {}


def test_terminating_endpoint_drains_then_leaves(kube: FakeKubeApi, tmp_path: Path) -> None:
    """The Endpoint object stays (draining: balancers skip it, its in-flight count goes on)
    while the slice lists it terminating, and leaves with it."""
    put(kube, "endpointslices", a_slice("web-a1b2c", "10.0.0.1", "10.0.0.2"))
    config = Config.model_validate(
        {
            "kubernetes": {"kubeconfig": str(kube.kubeconfig(tmp_path))},
            "upstreams": {"web": {"kubernetes": {"service": "web"}}},
        }
    )
    snapshot = compile_config(config, None)
    service = snapshot.services["web"]

    def states() -> dict[str, bool]:
        return {ep.label: ep.draining for ep in service.endpoints}

    async def go() -> None:
        orchestrator = Orchestrator(config, lambda: snapshot)
        orchestrator.start()
        try:
            await wait(lambda: len(service.endpoints) == 2)
            leaving = next(ep for ep in service.endpoints if ep.host == "10.0.0.2")
            leaving.in_flight = 1  # a request in progress on it
            terminating = a_slice("web-a1b2c", "10.0.0.1", "10.0.0.2")
            terminating["endpoints"][1]["conditions"] = {
                "ready": False,
                "serving": True,
                "terminating": True,
            }
            put(kube, "endpointslices", terminating)
            await wait(lambda: states() == {"10.0.0.1:8080": False, "10.0.0.2:8080": True})
            assert any(ep is leaving for ep in service.endpoints)  # the same object
            assert leaving.in_flight == 1
            put(kube, "endpointslices", a_slice("web-a1b2c", "10.0.0.1"))
            await wait(lambda: states() == {"10.0.0.1:8080": False})
        finally:
            await orchestrator.stop()

    asyncio.run(go())
