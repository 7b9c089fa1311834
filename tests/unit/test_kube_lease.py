"""policy.lease (leader election decisions), the Kubernetes config tables, and the small pure
helpers of the Kubernetes control code (CPU quantities, error explanations)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from portico.config.model import Config
from portico.control.kubeapi import KubeError
from portico.control.kubefleet import parse_cpu
from portico.policy.lease import Record, Step, leading, next_step, renew_deadline


def rec(holder: str, version: str = "7", duration: float = 15) -> Record:
    return Record(holder, "2026-01-01T00:00:00.000000Z", duration, 0, version)


def test_no_lease_creates_it() -> None:
    assert next_step(None, "me", 0.0, 100.0) is Step.CREATE


def test_holder_renews() -> None:
    assert next_step(rec("me"), "me", 0.0, 1000.0) is Step.RENEW


def test_follows_a_fresh_holder_and_takes_over_once_unchanged_for_the_duration() -> None:
    seen = 100.0
    assert next_step(rec("other"), "me", seen, seen + 14.9) is Step.FOLLOW
    assert next_step(rec("other"), "me", seen, seen + 15.0) is Step.ACQUIRE


def test_released_lease_is_taken_at_once() -> None:
    assert next_step(rec(""), "me", 100.0, 100.0) is Step.ACQUIRE


def test_leader_steps_down_before_others_may_take_over() -> None:
    deadline = renew_deadline(15, 5)
    assert deadline == 10
    assert leading(0.0, 9.9, deadline)
    assert not leading(0.0, 10.0, deadline)
    assert not leading(None, 0.0, deadline)


def test_cpu_quantities() -> None:
    assert parse_cpu("250m") == pytest.approx(0.25)
    assert parse_cpu("2") == 2.0
    assert parse_cpu("1500000n") == pytest.approx(0.0015)
    assert parse_cpu("5u") == pytest.approx(5e-6)


def test_forbidden_names_the_rule_to_add() -> None:
    exc = KubeError(403, "denied", verb="patch", resource="deployments/scale", namespace="shop")
    said = exc.explain()
    assert said.startswith("forbidden: cannot patch deployments/scale in namespace shop")
    assert "apiGroups: ['apps'], resources: ['deployments/scale'], verbs: ['patch']" in said


def test_config_tables() -> None:
    cfg = Config.model_validate(
        {
            "kubernetes": {"leader_election": {"lease": "portico-shop", "renew_every": 2}},
            "upstreams": {
                "web": {"app": {"kubernetes": {"deployment": "web", "port": "http"}, "min": 0}}
            },
        }
    )
    app = cfg.upstreams["web"].app
    assert app is not None and app.kubernetes is not None
    assert app.kubernetes.endpoints().service == "web"


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"upstreams": {"w": {"kubernetes": {"service": "Web_1"}}}}, "not a Kubernetes name"),
        ({"upstreams": {"w": {"kubernetes": {"service": "w", "port": 0}}}}, "1-65535"),
        ({"upstreams": {"w": {"kubernetes": {"service": "w", "port": "HTTP"}}}}, "port name"),
        (
            {"kubernetes": {"leader_election": {"lease_duration": 5, "renew_every": 5}}},
            "less than lease_duration",
        ),
        (
            {"upstreams": {"w": {"app": {"kubernetes": {"deployment": "w", "template": {}}}}}},
            "spec.containers",
        ),
        (
            {"upstreams": {"w": {"kubernetes": {"service": "w"}, "backends": ["http://a:1"]}}},
            "give one of backends, app or discover",
        ),
    ],
)
def test_bad_config_is_refused_with_the_reason(data: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError) as info:
        Config.model_validate(data)
    assert says in str(info.value)
