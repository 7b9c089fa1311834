"""The fleet seam: what the autoscaler needs of an app, whoever runs its instances.

Two implementations: ``Supervisor`` (instances Portico starts itself, one by one, through a
provider) and ``DeploymentFleet`` (the pods of a Kubernetes Deployment, where Kubernetes
runs the instances and Portico only writes the desired count). The autoscaler's decision
(``policy.scaling``) is the same for both: it sees counts and a signal, never how
instances are started.
"""

from __future__ import annotations

from typing import Protocol

from portico.config.model import App


class Fleet(Protocol):
    name: str
    spec: App
    desired: int

    def set_desired(self, n: int) -> None:
        """Ask for ``n`` instances (clamped to the app's min and max)."""

    def ready_count(self) -> int:
        """Instances taking traffic now."""

    def counted_count(self) -> int:
        """Instances asked for and not leaving: starting or ready."""

    def cpu_percent(self) -> float | None:
        """Mean CPU % per ready instance (100 = one core), or None when unknown."""
