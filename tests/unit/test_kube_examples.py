"""examples/kubernetes: every manifest reads as the API's objects (lightkube's models), the
ConfigMap's portico.toml passes Portico's schema, and the Role grants exactly the rules
that config needs (``control.kuberbac``), no more."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightkube import codecs

from portico.config.load import load_text
from portico.control.kuberbac import rules

EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "kubernetes"


def objects() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in sorted(EXAMPLE.glob("*.yaml")):
        with path.open() as f:
            for obj in codecs.load_all_yaml(f):
                found[f"{obj.kind}/{obj.metadata.name}"] = obj
    return found


def canonical(rule_list: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(
        (
            tuple(r["apiGroups"]),
            tuple(r["resources"]),
            tuple(sorted(r["verbs"])),
            tuple(r.get("resourceNames") or ()),
        )
        for r in rule_list
    )


def test_manifests_are_api_objects() -> None:
    assert sorted(objects()) == [
        "ConfigMap/portico",
        "Deployment/app",
        "Deployment/portico",
        "Role/portico",
        "RoleBinding/portico",
        "Service/app",
        "Service/portico",
        "ServiceAccount/portico",
    ]


def test_config_map_config_is_valid_and_role_is_least_privilege() -> None:
    found = objects()
    config = load_text(found["ConfigMap/portico"].data["portico.toml"])
    app = config.upstreams["app"].app
    assert app is not None and app.kubernetes is not None
    assert app.kubernetes.deployment == found["Deployment/app"].metadata.name
    service = found["Service/app"]
    assert app.kubernetes.service_name == service.metadata.name
    assert app.kubernetes.port in {p.name for p in service.spec.ports}
    role = found["Role/portico"].to_dict()
    assert canonical(role["rules"]) == canonical(rules(config)["default"])
    binding = found["RoleBinding/portico"]
    assert binding.roleRef.name == "portico"
    assert [s.name for s in binding.subjects] == ["portico"]
    pod = found["Deployment/portico"].spec.template.spec
    assert pod.serviceAccountName == "portico"
    env = {e.name: e.valueFrom.fieldRef.fieldPath for e in pod.containers[0].env}
    assert env == {"POD_NAME": "metadata.name"}  # the Lease identity


def test_rules_follow_the_config() -> None:
    config = load_text(
        """
[kubernetes]
namespace = "shop"
[upstreams.web.kubernetes]
service = "web"
[upstreams.api.app]
min = 0
[upstreams.api.app.kubernetes]
deployment = "api"
namespace = "backend"
[upstreams.api.app.kubernetes.template]
metadata = { labels = { app = "api" } }
spec = { containers = [{ name = "a", image = "a:1" }] }
[upstreams.api.app.autoscale]
metric = "cpu"
[[routes]]
path = "/api"
upstream = "api"
[[routes]]
path = "/"
upstream = "web"
"""
    )
    found = rules(config)
    assert canonical(found["shop"]) == [
        (("discovery.k8s.io",), ("endpointslices",), ("list", "watch"), ())
    ]
    assert canonical(found["backend"]) == [
        (("apps",), ("deployments",), ("create",), ()),
        (("apps",), ("deployments",), ("get", "patch"), ("api",)),
        (("apps",), ("deployments/scale",), ("get", "patch"), ("api",)),
        (("discovery.k8s.io",), ("endpointslices",), ("list", "watch"), ()),
        (("metrics.k8s.io",), ("pods",), ("list",), ()),
    ]
