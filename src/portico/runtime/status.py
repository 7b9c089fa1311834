"""Named status providers: how a feature adds its own section to the admin API's status.

A feature (TLS certificates, a Kubernetes leader election, a cache) registers a callable that
returns a JSON-able dict; ``GET /api/status`` shows each under its name and the dashboard lists
them. The registry belongs to the gateway, which hands it to whoever builds the feature, so
nothing is filled in at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

StatusProvider = Callable[[], dict[str, Any]]


class StatusProviders:
    """Providers by name. A provider that raises is reported as ``{"error": ...}``: one broken
    feature must not take the whole status page down."""

    def __init__(self) -> None:
        self._providers: dict[str, StatusProvider] = {}

    def register(self, name: str, provider: StatusProvider) -> None:
        self._providers[name] = provider

    def unregister(self, name: str) -> None:
        self._providers.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._providers)

    def collect(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in self.names():
            try:
                out[name] = dict(self._providers[name]())
            except Exception as exc:  # a feature's bug, shown where it belongs
                out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return out
