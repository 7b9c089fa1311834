"""Runs every app of a config: one supervisor (and, if asked, one autoscaler) per app, and
one Docker watcher per discovered upstream.

A reload (``apply``) follows the new config: apps and discoveries that appear start; those
that disappear drain and stop against the service they served (no longer in the snapshot);
those whose table changed are replaced, the old supervisor stopping only once the new one has
an instance ready (or its ready timeout passed), so the upstream is never left empty.

The provider is chosen by the app's spec: a ``docker`` table runs containers (one provider
per Docker Engine, shared by the apps on it), anything else runs local processes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from portico.config.model import App, Config
from portico.control.autoscaler import Autoscaler
from portico.control.discovery import Discovery
from portico.control.draining import wait_drained
from portico.control.fleet import Fleet
from portico.control.kubeapi import KubeApi
from portico.control.kubefleet import DeploymentFleet
from portico.control.kubewatch import SliceWatch
from portico.control.leader import LeaderElector
from portico.control.providers.base import Provider
from portico.control.providers.local import LocalProvider
from portico.control.supervisor import Supervisor
from portico.runtime import membership
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
        # Kubernetes (control/kube*.py, control/leader.py): one API client for all.
        self.kube = KubeApi(config.kubernetes)
        self.slice_watches: dict[str, SliceWatch] = {}
        self.fleets: dict[str, DeploymentFleet] = {}
        self.elector: LeaderElector | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        self._retiring: set[asyncio.Task[None]] = set()

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
        election = self.config.kubernetes.leader_election
        if election is not None:
            self.elector = LeaderElector(election, self.kube, self.events)
            self.kube.user_agent = f"portico ({self.elector.identity})"
            self.elector.start()
        for name in self.config.upstreams:
            self._start_upstream(name)

    def _start_upstream(self, name: str) -> None:
        upstream = self.config.upstreams[name]
        if upstream.discover is not None and name not in self.discoveries:
            watcher = Discovery(name, upstream.discover, self._service(name), self.events)
            self.discoveries[name] = watcher
            watcher.drain_settle = self.drain_settle
            watcher.start()
        if upstream.kubernetes is not None and name not in self.slice_watches:
            watch = SliceWatch(
                name, upstream.kubernetes, self.kube, self._service(name), self.events
            )
            self.slice_watches[name] = watch
            watch.start()
        app = upstream.app
        if app is not None and app.kubernetes is not None:
            self._start_fleet(name, app)
            return
        if app is None or name in self.supervisors:
            return
        sup = Supervisor(name, app, self.provider_for(app), self._service(name), self.events)
        self.supervisors[name] = sup
        sup.drain_settle = self.drain_settle
        sup.start()
        if app.autoscale is not None:
            scaler = Autoscaler(sup, app.autoscale, self._service(name), self.events)
            self.autoscalers[name] = scaler
            scaler.start()

    def leading(self) -> bool:
        """Whether this Portico runs the autoscalers and rolling restarts of Deployments:
        the Lease holder, or the only Portico when no election is configured."""
        return self.elector is None or self.elector.is_leader()

    def _start_fleet(self, name: str, app: App) -> None:
        if name in self.fleets:
            return
        fleet = DeploymentFleet(name, app, self.kube, self._service(name), self.events)
        fleet.leading = self.leading
        self.fleets[name] = fleet
        fleet.start()
        if app.autoscale is not None:
            scaler = Autoscaler(fleet, app.autoscale, self._service(name), self.events)
            scaler.leading = self.leading
            self.autoscalers[name] = scaler
            scaler.start()

    def _apply_kubernetes(self, old: Config, config: Config) -> None:
        """A changed or removed Kubernetes table stops its watch or fleet (the new one, if
        any, starts from a re-list; endpoints are kept by address meanwhile)."""
        for name, up in old.upstreams.items():
            new = config.upstreams.get(name)
            if up.kubernetes is not None and (new is None or new.kubernetes != up.kubernetes):
                self._retire(self.slice_watches.pop(name).stop())
            old_app = up.app.kubernetes if up.app is not None else None
            new_app = new.app.kubernetes if new is not None and new.app is not None else None
            if old_app is not None and (new is None or new.app != up.app):
                fleet = self.fleets.pop(name)
                scaler = self.autoscalers.pop(name, None)
                if scaler is not None:
                    self._retire(scaler.stop())
                if new_app is None:
                    self.events.add(name, "reload", f"deployment of {name} no longer followed")
                    self._retire(self._leave_fleet(fleet, name))
                else:
                    self._retire(fleet.stop())

    async def _leave_fleet(self, fleet: DeploymentFleet, name: str) -> None:
        """The upstream is no longer the Deployment's: its pods' endpoints serve until the
        app that replaces it (if any) has a ready instance, then leave. The Deployment
        itself is left as it is."""
        await fleet.stop()
        successor = self.supervisors.get(name)
        if successor is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + successor.spec.ready_timeout
            while not successor.ready and successor.desired > 0 and loop.time() < deadline:
                await asyncio.sleep(0.05)
        try:
            service = fleet.service_of()
        except KeyError:
            return  # the upstream is gone with its endpoints
        pods = {(host, port) for host, port, _ in fleet.watch.rows}
        for ep in [e for e in service.endpoints if e.address in pods]:
            membership.leave(service, ep)

    def kubernetes_status(self) -> dict[str, Any]:
        """JSON-able: leadership, and each Kubernetes upstream's state (for the admin API)."""
        if self.elector is not None:
            leader: dict[str, Any] = self.elector.status()
        else:
            leader = {"leader": True, "identity": None, "holder": None, "renewed": None}
        return {
            "leader": leader,
            "deployments": {name: f.status() for name, f in self.fleets.items()},
            "services": {name: w.status() for name, w in self.slice_watches.items()},
        }

    def apply(self, config: Config, previous: Snapshot) -> None:
        """Follow a reload. The new snapshot is already swapped in; ``previous`` is the one
        it replaced, whose services the leaving apps and discoveries drain."""
        old, self.config = self.config, config
        self._apply_kubernetes(old, config)
        for name, up in old.upstreams.items():
            new = config.upstreams.get(name)
            new_discover = new.discover if new is not None else None
            new_app = new.app if new is not None else None
            service = previous.services.get(name)
            if up.discover is not None and new_discover != up.discover:
                watcher = self.discoveries.pop(name)
                if new_discover is None:
                    if service is not None:
                        watcher.service_of = _fixed(service)
                    self.events.add(name, "reload", f"discovery of {name} removed by a reload")
                    self._retire(watcher.stop())
                else:
                    self.events.add(name, "reload", f"discovery of {name} changed: restarting")
                    self._start_upstream(name)
                    self._retire(self._replace_discovery(watcher, self.discoveries[name]))
            if up.app is not None and up.app.kubernetes is None and new_app != up.app:
                sup = self.supervisors.pop(name)
                scaler = self.autoscalers.pop(name, None)
                if new_app is None:
                    # Its endpoints are no longer the upstream's: drain them where they are.
                    if service is not None:
                        sup.service_of = _fixed(service)
                    self.events.add(name, "reload", f"app {name} removed by a reload")
                    self._retire(self._stop_app(sup, scaler, None))
                else:
                    self.events.add(name, "reload", f"app {name} changed: replacing it")
                    self._start_upstream(name)
                    successor = self.supervisors.get(name) or self.fleets.get(name)
                    self._retire(self._stop_app(sup, scaler, successor))
        for name in config.upstreams:
            self._start_upstream(name)

    async def _stop_app(
        self, old: Supervisor, scaler: Autoscaler | None, successor: Fleet | None
    ) -> None:
        if scaler is not None:
            await scaler.stop()
        if successor is not None and old.ready:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + successor.spec.ready_timeout
            while not successor.ready_count() and successor.desired > 0 and loop.time() < deadline:
                await asyncio.sleep(0.05)
        await old.stop()

    async def _replace_discovery(self, old: Discovery, successor: Discovery) -> None:
        """Stop ``old``; its endpoints serve until ``successor`` has admitted a container (or
        its ready timeout passed), then drain and leave, except those the successor took
        over by address (``membership.join`` replaces them)."""
        leftovers = [m.endpoint for m in old.members.values() if m.endpoint is not None]
        await old.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + successor.spec.ready_timeout
        while not any(m.endpoint for m in successor.members.values()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for ep in leftovers:
            membership.drain(ep)
        await asyncio.gather(
            *(wait_drained(ep, successor.spec.drain_timeout, self.drain_settle) for ep in leftovers)
        )
        for ep in leftovers:
            membership.leave(successor.service_of(), ep)

    def _retire(self, stopping: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(stopping)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def rolling_restart(self, only: str | None = None) -> None:
        """Replace every instance of every app (or of app ``only``), one at a time per app."""
        loop = asyncio.get_running_loop()
        restarting: list[tuple[str, Supervisor | DeploymentFleet]] = [
            *self.supervisors.items(),
            *self.fleets.items(),
        ]
        for name, sup in restarting:
            if only is not None and name != only:
                continue
            task = loop.create_task(sup.rolling_restart())
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)

    def kill(self) -> None:
        """Kill every local instance now (a second Ctrl-C); ``stop`` then finds them gone."""
        self.provider.close()

    async def stop(self) -> None:
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        for scaler in self.autoscalers.values():
            await scaler.stop()
        for task in list(self._restarts):
            task.cancel()
        for watcher in self.discoveries.values():
            await watcher.stop()
        for watch in self.slice_watches.values():
            await watch.stop()
        for fleet in self.fleets.values():
            await fleet.stop()
        if self.elector is not None:
            await self.elector.stop()
        await self.kube.close()
        await asyncio.gather(*(sup.stop() for sup in self.supervisors.values()))
        self.provider.close()
        for provider in self.docker_providers.values():
            provider.close()


def _fixed(service: Service) -> Callable[[], Service]:
    return lambda: service
