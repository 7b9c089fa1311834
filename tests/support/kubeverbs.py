"""The fake API's verbs on single objects: get, create, update (with resourceVersion
conflicts), patch, and the Deployment scale subresource. Objects pass through lightkube's
models on the way in and out, so a shape the real API would refuse fails here too."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from lightkube.models.autoscaling_v1 import Scale, ScaleSpec, ScaleStatus
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.coordination_v1 import Lease

from tests.support.kubeapi import GROUPS, status

if TYPE_CHECKING:
    from tests.support.kubeapi import FakeKubeApi

Answer = tuple[int, Any, dict[str, str]]
MODELS: dict[str, Any] = {"deployments": Deployment, "leases": Lease}


def not_found(resource: str, name: str) -> Answer:
    group = GROUPS[resource][0]
    return (
        404,
        status(
            404,
            "NotFound",
            f'{resource}.{group} "{name}" not found',
            name=name,
            group=group,
            kind=resource,
        ),
        {},
    )


def scale_of(deployment: dict[str, Any]) -> dict[str, Any]:
    meta = deployment["metadata"]
    labels = deployment["spec"]["selector"].get("matchLabels") or {}
    return Scale(
        apiVersion="autoscaling/v1",
        kind="Scale",
        metadata=ObjectMeta(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            resourceVersion=meta["resourceVersion"],
            creationTimestamp=None,
        ),
        spec=ScaleSpec(replicas=deployment["spec"].get("replicas", 1)),
        status=ScaleStatus(
            replicas=(deployment.get("status") or {}).get("replicas", 0),
            selector=",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        ),
    ).to_dict()


def handle(
    api: FakeKubeApi, verb: str, resource: str, ns: str, name: str, sub: str, body: Any
) -> Answer:
    from tests.support.kubeapi import merge

    current = api.get(resource, ns, name) if name else None
    if verb == "create":
        assert isinstance(body, dict)
        model = MODELS.get(resource)
        if model is None:
            return 405, status(405, "MethodNotAllowed", "create not supported here"), {}
        name = body["metadata"]["name"]
        if api.get(resource, ns, name) is not None:
            group = GROUPS[resource][0]
            message = f'{resource}.{group} "{name}" already exists'
            return 409, status(409, "AlreadyExists", message, name=name, kind=resource), {}
        obj = model.from_dict(body).to_dict()  # what the API keeps is what the model reads
        obj["metadata"]["namespace"] = ns
        if resource == "deployments":
            obj["metadata"]["generation"] = 1
            obj.setdefault("status", {})
        return 201, copy.deepcopy(api.put(resource, obj)), {}
    if current is None:
        return not_found(resource, name)
    if verb == "get":
        return 200, copy.deepcopy(scale_of(current) if sub == "scale" else current), {}
    if verb == "update":
        assert isinstance(body, dict)
        sent = (body.get("metadata") or {}).get("resourceVersion")
        if sent != current["metadata"]["resourceVersion"]:
            group = GROUPS[resource][0]
            message = (
                f'Operation cannot be fulfilled on {resource}.{group} "{name}": the object has'
                " been modified; please apply your changes to the latest version and try again"
            )
            return 409, status(409, "Conflict", message, name=name, kind=resource), {}
        obj = MODELS[resource].from_dict(body).to_dict()
        obj["metadata"] = {**current["metadata"], **obj["metadata"]}
        return 200, copy.deepcopy(api.put(resource, obj)), {}
    if verb == "patch":
        assert isinstance(body, dict)
        obj = copy.deepcopy(current)
        if sub == "scale":
            replicas = (body.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                return 422, status(422, "Invalid", "spec.replicas: must be >= 0"), {}
            obj["spec"]["replicas"] = replicas
        else:
            merge(obj, body)
        if obj["spec"] != current["spec"]:
            obj["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        MODELS[resource].from_dict(obj)
        stored = api.put(resource, obj)
        return 200, copy.deepcopy(scale_of(stored) if sub == "scale" else stored), {}
    return 405, status(405, "MethodNotAllowed", f"{verb} not supported here"), {}
