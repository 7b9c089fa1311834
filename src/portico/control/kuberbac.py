"""The Role a Portico config needs, least privilege: only the verbs its Kubernetes features
use, on the named objects where the API allows naming them.

``rules(config)`` returns Role rules (as in a Role manifest's ``rules:``) per namespace.
docs/kubernetes.md lists them, and the test of ``examples/kubernetes`` checks that the
example's Role is exactly what its ConfigMap's config needs.

Why each verb:

* endpointslices ``list``, ``watch``: discovery (list, then watch from its resourceVersion);
  not nameable (slices have generated names), selected by the service-name label;
* deployments ``get``: read the Deployment's selector (the metrics query uses it);
  ``patch``: a rolling restart patches the pod template annotation;
  ``create``: only with a ``template`` in the config (not nameable: create has no name yet);
* deployments/scale ``get``, ``patch``: read and write replicas;
* leases ``get``, ``update`` on the Lease, ``create`` (not nameable) for the first replica;
* metrics.k8s.io pods ``list``: only for ``autoscale.metric = "cpu"``.
"""

from __future__ import annotations

from typing import Any

from portico.config.model import Config


def rules(config: Config) -> dict[str, list[dict[str, Any]]]:
    """Namespace -> the Role rules Portico needs there."""
    default = config.kubernetes.namespace or "default"
    out: dict[str, list[dict[str, Any]]] = {}

    def add(ns: str | None, group: str, resource: str, verbs: list[str], name: str = "") -> None:
        rule: dict[str, Any] = {"apiGroups": [group], "resources": [resource], "verbs": verbs}
        if name:
            rule["resourceNames"] = [name]
        bucket = out.setdefault(ns or default, [])
        for existing in bucket:  # one rule per (group, resource, verbs), names merged
            same = {k: v for k, v in existing.items() if k != "resourceNames"}
            if same == {k: v for k, v in rule.items() if k != "resourceNames"}:
                if name and name not in existing.get("resourceNames", [name]):
                    existing["resourceNames"].append(name)
                return
        bucket.append(rule)

    slices: set[str | None] = set()
    for up in config.upstreams.values():
        if up.kubernetes is not None:
            slices.add(up.kubernetes.namespace)
        app = up.app
        if app is None or app.kubernetes is None:
            continue
        kube = app.kubernetes
        slices.add(kube.namespace)
        add(kube.namespace, "apps", "deployments", ["get", "patch"], kube.deployment)
        if kube.template is not None:
            add(kube.namespace, "apps", "deployments", ["create"])
        add(kube.namespace, "apps", "deployments/scale", ["get", "patch"], kube.deployment)
        if app.autoscale is not None and app.autoscale.metric == "cpu":
            add(kube.namespace, "metrics.k8s.io", "pods", ["list"])
    for ns in sorted(slices, key=lambda n: n or ""):
        add(ns, "discovery.k8s.io", "endpointslices", ["list", "watch"])
    election = config.kubernetes.leader_election
    if election is not None:
        add(election.namespace, "coordination.k8s.io", "leases", ["get", "update"], election.lease)
        add(election.namespace, "coordination.k8s.io", "leases", ["create"])
    return out
