"""Runs every app of a config: one supervisor (and, if asked, one autoscaler) per app, and
one Docker watcher per discovered upstream.

The provider is chosen by the app's spec: a ``docker`` table runs containers (one provider
per Docker Engine, shared by the apps on it), anything else runs local processes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from portico.config.model import App, Config
from portico.control.autoscaler import Autoscaler
from portico.control.discovery import Discovery
from portico.control.providers.base import Provider
from portico.control.providers.local import LocalProvider
from portico.control.supervisor import Supervisor
from portico.runtime.events import EventLog
from portico.runtime.snapshot import Service, Snapshot

log = logging.getLogger("portico.app")


class Orchestrator:
    def __init__(
        self, config: Config, snapshot_of: Callable[[], Snapshot], drain_settle: float = 0.0
    ) -> None:
        self.config = config
        # With several workers, in-flight counts reach us a report late (control.bus).
        self.drain_settle = drain_settle
        self.snapshot_of = snapshot_of
        self.events = EventLog()
        self.provider = LocalProvider()
        self.docker_providers: dict[str | None, Provider] = {}  # by docker_host
        self.supervisors: dict[str, Supervisor] = {}
        self.autoscalers: dict[str, Autoscaler] = {}
        self.discoveries: dict[str, Discovery] = {}
        self._restarts: set[asyncio.Task[None]] = set()

    def _service(self, name: str) -> Callable[[], Service]:
        return lambda: self.snapshot_of().services[name]

    def provider_for(self, app: App) -> Provider:
        if app.docker is None:
            return self.provider
        host = app.docker.docker_host
        provider = self.docker_providers.get(host)
        if provider is None:
            # Imported here: the Docker provider is an optional extra (portico[docker]), and
            # its module only touches the SDK when it first connects, but process-only
            # setups need not load it at all.
            from portico.control.providers.docker import DockerProvider

            provider = self.docker_providers[host] = DockerProvider(host)
        return provider

    def start(self) -> None:
        for name, upstream in self.config.upstreams.items():
            if upstream.discover is not None:
                watcher = Discovery(name, upstream.discover, self._service(name), self.events)
                self.discoveries[name] = watcher
                watcher.drain_settle = self.drain_settle
                watcher.start()
            app = upstream.app
            if app is None:
                continue
            sup = Supervisor(name, app, self.provider_for(app), self._service(name), self.events)
            self.supervisors[name] = sup
            sup.drain_settle = self.drain_settle
            sup.start()
            if app.autoscale is not None:
                scaler = Autoscaler(sup, app.autoscale, self._service(name), self.events)
                self.autoscalers[name] = scaler
                scaler.start()

    def rolling_restart(self) -> None:
        """Replace every instance of every app, one at a time per app."""
        loop = asyncio.get_running_loop()
        for sup in self.supervisors.values():
            task = loop.create_task(sup.rolling_restart())
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    def kill(self) -> None:
        """Kill every local instance now (a second Ctrl-C); ``stop`` then finds them gone."""
        self.provider.close()

    async def stop(self) -> None:
        for scaler in self.autoscalers.values():
            await scaler.stop()
        for task in list(self._restarts):
            task.cancel()
        for watcher in self.discoveries.values():
            await watcher.stop()
        await asyncio.gather(*(sup.stop() for sup in self.supervisors.values()))
        self.provider.close()
        for provider in self.docker_providers.values():
            provider.close()
