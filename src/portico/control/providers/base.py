"""The provider seam: how the supervisor starts, watches and stops instances.

A provider knows how to run one instance of an app (a local process, a container) and nothing
about readiness, traffic or scaling: those belong to the supervisor.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from portico.config.model import App


class Instance(Protocol):
    """A running (or finished) instance, as the supervisor sees it."""

    id: str
    host: str
    port: int

    def alive(self) -> bool: ...
    def exit_code(self) -> int | None: ...
    def cpu_percent(self) -> float: ...


class Provider(Protocol):
    async def start(self, app_name: str, spec: App, instance_id: str) -> Instance: ...
    async def stop(self, instance: Instance, timeout: float) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class Adopting(Protocol):
    """A provider whose instances can outlive Portico (containers do; local processes die
    with it), and can find them again when Portico restarts."""

    async def existing(self, app_name: str, spec: App) -> list[Instance]: ...
