"""Config for Kubernetes (``pip install portico[kubernetes]``): how to reach the cluster and
elect a leader (the top-level ``[kubernetes]`` table), the Service whose EndpointSlices an
upstream follows (``[upstreams.NAME.kubernetes]``), and the Deployment an app scales
(``[upstreams.NAME.app.kubernetes]``). Validated through ``portico.config.model.Config``."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from portico.config.types import PositiveSeconds, Strict

# RFC 1123 label / subdomain: what Kubernetes accepts as a Service, Deployment or Lease name.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")


def _k8s_name(v: str | None) -> str | None:
    if v is not None and not _NAME.match(v):
        raise ValueError(f"{v!r} is not a Kubernetes name (lower-case RFC 1123)")
    return v


class LeaderElection(Strict):
    """One of several Portico replicas runs the autoscalers and rolling restarts: the holder
    of a coordination.k8s.io/v1 Lease, renewed while it lives and taken over once expired."""

    lease: str = Field("portico", description="Lease name")
    namespace: str | None = Field(None, description="unset = kubernetes.namespace")
    identity: str | None = Field(
        None, description="this replica's name in the Lease; unset = $POD_NAME, else host-pid"
    )
    lease_duration: PositiveSeconds = Field(
        15.0, description="a holder not renewed for this long may be replaced"
    )
    renew_every: PositiveSeconds = Field(
        5.0, description="seconds between renewals (and between tries of a follower)"
    )

    @field_validator("lease", "namespace")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return _k8s_name(v)

    @model_validator(mode="after")
    def _renew_within_lease(self) -> LeaderElection:
        if self.renew_every >= self.lease_duration:
            raise ValueError(
                f"renew_every ({self.renew_every:g}) must be less than lease_duration"
                f" ({self.lease_duration:g}), or the lease lapses between renewals"
            )
        return self


class Kubernetes(Strict):
    """How Portico reaches the API server."""

    kubeconfig: str | None = Field(
        None,
        description="kubeconfig file; unset = the pod's service account, else $KUBECONFIG,"
        " else ~/.kube/config",
    )
    context: str | None = Field(None, description="kubeconfig context; unset = current")
    namespace: str | None = Field(
        None, description="default namespace; unset = the service account's or the context's"
    )
    leader_election: LeaderElection | None = Field(
        None, description="unset = this Portico acts alone (always the leader)"
    )

    @field_validator("namespace")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return _k8s_name(v)


def _port(v: str | int | None) -> str | int | None:
    if isinstance(v, str) and not _PORT_NAME.match(v):
        raise ValueError(f"{v!r} is not a port name (IANA_SVC_NAME) nor a number")
    if isinstance(v, int) and not 1 <= v <= 65535:
        raise ValueError("must be 1-65535")
    return v


class KubeEndpoints(Strict):
    """An upstream whose endpoints are a Service's ready pods, from its EndpointSlices."""

    service: str = Field(min_length=1, description="the Service's name")
    namespace: str | None = Field(None, description="unset = kubernetes.namespace")
    port: str | int | None = Field(
        None, description="port name (e.g. 'http') or number; unset = the slice's only port"
    )

    @field_validator("service", "namespace")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return _k8s_name(v)

    @field_validator("port")
    @classmethod
    def _ports(cls, v: str | int | None) -> str | int | None:
        return _port(v)


class KubeDeployment(Strict):
    """App instances as the pods of a Deployment: Portico sets its replicas (scale
    subresource), follows its Service's EndpointSlices, and restarts it as `kubectl rollout
    restart` does."""

    deployment: str = Field(min_length=1, description="the Deployment's name")
    service: str | None = Field(None, description="Service selecting its pods; unset = deployment")
    namespace: str | None = Field(None, description="unset = kubernetes.namespace")
    port: str | int | None = Field(
        None, description="port name or number in the EndpointSlices; unset = the only port"
    )
    template: dict[str, Any] | None = Field(
        None,
        description="pod template (spec.template of a Deployment) to create the Deployment"
        " with when it does not exist; unset = it must exist",
    )

    @field_validator("deployment", "service", "namespace")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return _k8s_name(v)

    @field_validator("port")
    @classmethod
    def _ports(cls, v: str | int | None) -> str | int | None:
        return _port(v)

    @field_validator("template")
    @classmethod
    def _template_shape(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        containers = (v.get("spec") or {}).get("containers")
        if not isinstance(containers, list) or not containers:
            raise ValueError("needs spec.containers (a pod template, as in a Deployment)")
        labels = (v.get("metadata") or {}).get("labels")
        if not isinstance(labels, dict) or not labels:
            raise ValueError("needs metadata.labels (they become the Deployment's selector)")
        return v

    @property
    def service_name(self) -> str:
        return self.service or self.deployment

    def endpoints(self) -> KubeEndpoints:
        return KubeEndpoints(service=self.service_name, namespace=self.namespace, port=self.port)
