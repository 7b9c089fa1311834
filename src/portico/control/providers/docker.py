"""Containers as instances: an image run by the Docker Engine, one container per instance.

The provider creates, labels, starts, stops and removes containers; readiness, draining and
scaling stay with the supervisor, exactly as for local processes. Every container carries

* ``portico.managed=1`` and ``portico.app=<app>``: how Portico finds its containers again;
* ``portico.instance=<id>`` (``web-3``) and ``portico.port=<host port>``: what an adopted
  container is called and where it serves;
* ``portico.spec=<digest>``: a digest of the settings that shape a container (image, command,
  environment, network, limits), so a restarted Portico adopts only containers that match
  its config and replaces the others.

Networking. With ``network_mode = "host"`` (the default) the container shares the host's
network and listens on the free port Portico picked (``{port}`` and ``$PORT``), as a local
process would. On any other network it listens on ``docker.port``, which is published on
127.0.0.1 at a free host port; that is where Portico sends traffic.

Liveness comes from the engine's ``die`` events (one subscription per provider), so
``alive()`` is a flag read without a call to the engine. CPU comes from one-shot container
stats, sampled in the background when the autoscaler asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import secrets
from collections import OrderedDict
from typing import Any

from portico.config.model import App, DockerRun
from portico.control.engine import Engine, EngineError, NotFound
from portico.control.ports import PORTS
from portico.control.providers.base import Instance

log = logging.getLogger("portico.app")

LABEL_MANAGED = "portico.managed"
LABEL_APP = "portico.app"
LABEL_INSTANCE = "portico.instance"
LABEL_PORT = "portico.port"
LABEL_SPEC = "portico.spec"

# Deaths of containers the provider did not know yet (an adoption racing a die event),
# remembered so the instance is born dead rather than alive forever. Bounded: only the most
# recent ones can matter.
RECENT_DEATHS = 256
# Exit code reported for a container that vanished without a die event we saw.
GONE = -1
# Lines of a crashed container's output copied to Portico's log before it is removed.
CRASH_LOG_LINES = 20

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")


def spec_digest(spec: App) -> str:
    """What a container is made of, hashed: equal digests mean an adoptable container."""
    docker = spec.docker
    assert docker is not None
    shape = {
        "image": docker.image,
        "command": docker.command,
        "env": {**spec.env, **docker.env},
        "port": docker.port,
        "network_mode": docker.network_mode,
        "cpus": docker.cpus,
        "memory": int(docker.memory) if docker.memory is not None else None,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def cpu_percent(previous: dict[str, Any], current: dict[str, Any]) -> float:
    """CPU % between two stats samples, as ``docker stats`` computes it (100 = one core)."""
    try:
        used = current["cpu_usage"]["total_usage"] - previous["cpu_usage"]["total_usage"]
        system = current["system_cpu_usage"] - previous["system_cpu_usage"]
        cpus = current.get("online_cpus") or len(current["cpu_usage"].get("percpu_usage") or [1])
    except (KeyError, TypeError):
        return 0.0
    if system <= 0 or used < 0:
        return 0.0
    return float(used) / float(system) * float(cpus) * 100.0


class DockerInstance:
    __slots__ = (
        "_cpu",
        "_exit_code",
        "_provider",
        "_sample",
        "_sampling",
        "container_id",
        "host",
        "id",
        "keep",
        "name",
        "port",
        "stopping",
    )

    def __init__(
        self,
        provider: DockerProvider,
        instance_id: str,
        port: int,
        container_id: str,
        name: str,
        keep: bool,
    ) -> None:
        self.id = instance_id
        self.host = "127.0.0.1"
        self.port = port
        self.container_id = container_id
        self.name = name
        self.keep = keep
        self.stopping = False  # Portico is stopping it: its death is no crash
        self._provider = provider
        self._exit_code: int | None = None
        self._cpu = 0.0
        self._sample: dict[str, Any] | None = None
        self._sampling = False

    def __repr__(self) -> str:
        return f"<DockerInstance {self.id} {self.container_id[:12]} port={self.port}>"

    def alive(self) -> bool:
        return self._exit_code is None

    def exit_code(self) -> int | None:
        return self._exit_code

    def cpu_percent(self) -> float:
        """CPU % between the two latest samples; asks for the next one in the background,
        so a caller on a timer (the autoscaler) sees the last interval's value."""
        self._provider.sample_soon(self)
        return self._cpu


class DockerProvider:
    """Runs instances as containers of one Docker Engine."""

    def __init__(self, docker_host: str | None = None) -> None:
        self.engine = Engine(docker_host)
        self._instances: dict[str, DockerInstance] = {}  # container id -> instance
        self._deaths: OrderedDict[str, int] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready: asyncio.Lock | None = None
        self._subscribed = False
        self._one_shot = True  # engines before API 1.41 lack one-shot stats

    async def _open(self) -> None:
        """Connect and subscribe to our containers' events, once, before the first create."""
        if self._ready is None:
            self._ready = asyncio.Lock()
        async with self._ready:
            if self._subscribed:
                return
            await self.engine.open()
            filters = {"type": "container", "label": [f"{LABEL_MANAGED}=1"]}
            await self.engine.feed(filters, self._on_event, self._resync).start()
            self._subscribed = True

    # --- the provider seam ----------------------------------------------------------------

    async def start(self, app_name: str, spec: App, instance_id: str) -> DockerInstance:
        await self._open()
        docker = spec.docker
        assert docker is not None, "DockerProvider runs apps with a docker table"
        host_port = PORTS.allocate()
        port = host_port if docker.host_network else docker.port
        assert port is not None
        name = f"portico-{_NAME_UNSAFE.sub('-', instance_id)}-{secrets.token_hex(3)}"
        options = self._create_options(app_name, spec, docker, instance_id, host_port, port)
        client = self.engine.client
        try:
            try:
                container = await self.engine.run(client.containers.create, name=name, **options)
            except NotFound:
                log.info("%s: pulling %s", instance_id, docker.image)
                await self.engine.run(client.images.pull, docker.image)
                container = await self.engine.run(client.containers.create, name=name, **options)
        except OSError:
            PORTS.release(host_port)
            raise
        instance = DockerInstance(self, instance_id, host_port, container.id, name, docker.keep)
        self._track(instance)  # before the start: its die event must find it
        try:
            await self.engine.run(client.api.start, container.id)
        except EngineError:
            self._forget(instance)
            with contextlib.suppress(EngineError):
                await self.engine.run(client.api.remove_container, container.id, force=True)
            raise
        log.info("%s is container %s (%s)", instance_id, name, container.id[:12])
        return instance

    def _create_options(
        self,
        app_name: str,
        spec: App,
        docker: DockerRun,
        instance_id: str,
        host_port: int,
        port: int,
    ) -> dict[str, Any]:
        env = {**spec.env, **docker.env, "PORT": str(port), "PORTICO_INSTANCE": instance_id}
        options: dict[str, Any] = {
            "image": docker.image,
            "environment": env,
            "labels": {
                LABEL_MANAGED: "1",
                LABEL_APP: app_name,
                LABEL_INSTANCE: instance_id,
                LABEL_PORT: str(host_port),
                LABEL_SPEC: spec_digest(spec),
            },
            "network_mode": docker.network_mode,
            "detach": True,
        }
        if docker.command is not None:
            options["command"] = [part.replace("{port}", str(port)) for part in docker.command]
        if not docker.host_network:
            # Loopback only: the container is reachable through Portico, not from outside.
            options["ports"] = {f"{port}/tcp": ("127.0.0.1", host_port)}
        if docker.cpus is not None:
            options["nano_cpus"] = int(docker.cpus * 1e9)
        if docker.memory is not None:
            options["mem_limit"] = int(docker.memory)
        if docker.ulimits:
            options["ulimits"] = [
                {"Name": name, "Soft": limit, "Hard": limit}
                for name, limit in sorted(docker.ulimits.items())
            ]
        return options

    async def existing(self, app_name: str, spec: App) -> list[Instance]:
        """Running containers of this app left by an earlier Portico (killed, or ``keep``),
        adopted as instances. Stopped ones, and ones made from other settings, are removed."""
        await self._open()
        client = self.engine.client
        filters = {"label": [f"{LABEL_MANAGED}=1", f"{LABEL_APP}={app_name}"]}
        found = await self.engine.run(client.api.containers, all=True, filters=filters)
        digest = spec_digest(spec)
        keep = spec.keeps_instances
        adopted: list[Instance] = []
        for info in found:
            labels = info.get("Labels") or {}
            cid = info["Id"]
            name = (info.get("Names") or ["/?"])[0].lstrip("/")
            running = info.get("State") == "running"
            ours = labels.get(LABEL_SPEC) == digest and labels.get(LABEL_PORT, "").isdigit()
            if running and ours:
                instance_id = labels.get(LABEL_INSTANCE) or name
                instance = DockerInstance(
                    self, instance_id, int(labels[LABEL_PORT]), cid, name, keep
                )
                PORTS.claim(instance.port)
                self._track(instance)
                adopted.append(instance)
                log.info("%s: adopted container %s (%s)", instance_id, name, cid[:12])
                continue
            why = "not running" if not running else "made from other settings"
            log.info("%s: removing container %s (%s)", app_name, name, why)
            with contextlib.suppress(NotFound):
                await self.engine.run(client.api.remove_container, cid, force=True)
        return adopted

    async def stop(self, instance: Instance, timeout: float) -> None:
        """SIGTERM (the image's stop signal), SIGKILL after ``timeout``; then remove."""
        assert isinstance(instance, DockerInstance)
        api = self.engine.client.api
        cid = instance.container_id
        instance.stopping = True
        try:
            # The engine takes whole seconds; round up so the app gets at least its time.
            await self.engine.run(api.stop, cid, timeout=max(0, math.ceil(timeout)))
            state = await self.engine.run(api.inspect_container, cid)
            if instance._exit_code is None:
                instance._exit_code = int(state["State"].get("ExitCode", GONE))
            await self.engine.run(api.remove_container, cid, force=True)
        except NotFound:
            pass
        finally:
            if instance._exit_code is None:
                instance._exit_code = GONE
            self._forget(instance)

    def close(self) -> None:
        """Last resort on exit: remove containers still tracked (unless kept), then hang up."""
        api = self.engine.client.api if self.engine.client is not None else None
        for instance in list(self._instances.values()):
            if api is not None and not instance.keep:
                with contextlib.suppress(Exception):
                    api.remove_container(instance.container_id, force=True)
        self._instances.clear()
        for task in self._tasks:
            task.cancel()
        self.engine.close()

    # --- engine events, resync and stats ------------------------------------------------

    def _track(self, instance: DockerInstance) -> None:
        self._instances[instance.container_id] = instance
        code = self._deaths.pop(instance.container_id, None)
        if code is not None:
            instance._exit_code = code

    def _forget(self, instance: DockerInstance) -> None:
        self._instances.pop(instance.container_id, None)
        PORTS.release(instance.port)

    def _died(self, cid: str, code: int) -> None:
        instance = self._instances.get(cid)
        if instance is None:
            self._deaths[cid] = code
            while len(self._deaths) > RECENT_DEATHS:
                self._deaths.popitem(last=False)
            return
        if instance._exit_code is None:
            instance._exit_code = code
        if not instance.stopping:
            # A crash: the supervisor replaces the instance; the dead container is ours to
            # clear away, or crash loops would pile them up. Its last words go to our log.
            instance.stopping = True
            self._spawn(self._bury(instance))

    async def _bury(self, instance: DockerInstance) -> None:
        api = self.engine.client.api
        cid = instance.container_id
        try:
            tail = await self.engine.run(api.logs, cid, tail=CRASH_LOG_LINES)
            for line in tail.decode("utf-8", "replace").splitlines():
                log.info("[%s] %s", instance.id, line)
            await self.engine.run(api.remove_container, cid, force=True)
        except EngineError as exc:
            log.debug("%s: removing crashed container %s: %s", instance.id, cid[:12], exc)
        self._forget(instance)

    def _on_event(self, event: dict[str, Any]) -> None:
        action = event.get("Action") or event.get("status") or ""
        actor = event.get("Actor") or {}
        cid = actor.get("ID") or event.get("id") or ""
        if action == "die":
            code = str((actor.get("Attributes") or {}).get("exitCode", GONE))
            self._died(cid, int(code) if code.lstrip("-").isdigit() else GONE)
        elif action == "destroy":
            self._died(cid, GONE)
        elif action == "oom" and cid in self._instances:
            log.warning("%s ran out of memory", self._instances[cid].id)

    def _resync(self) -> None:
        """After (re)connecting the events stream: find deaths we may have missed."""
        if self._instances:
            self._spawn(self._resync_now())

    async def _resync_now(self) -> None:
        filters = {"label": [f"{LABEL_MANAGED}=1"]}
        try:
            found = await self.engine.run(self.engine.client.api.containers, filters=filters)
        except EngineError as exc:
            log.warning("docker: cannot list containers to resync: %s", exc)
            return
        running = {info["Id"] for info in found}
        for cid in list(self._instances):
            if cid not in running:
                self._died(cid, GONE)

    def sample_soon(self, instance: DockerInstance) -> None:
        if not instance._sampling and instance.alive() and self._subscribed:
            instance._sampling = True
            self._spawn(self._sample(instance))

    async def _sample(self, instance: DockerInstance) -> None:
        stats = await self._stats(instance.container_id)
        instance._sampling = False
        if stats is None:
            return
        current = stats.get("cpu_stats") or {}
        if instance._sample is not None:
            instance._cpu = cpu_percent(instance._sample, current)
        elif not self._one_shot:  # a streamed sample carries its own previous one
            instance._cpu = cpu_percent(stats.get("precpu_stats") or {}, current)
        instance._sample = current

    async def _stats(self, cid: str) -> dict[str, Any] | None:
        api = self.engine.client.api
        try:
            if self._one_shot:
                try:
                    result: dict[str, Any] = await self.engine.run(
                        api.stats, cid, stream=False, one_shot=True
                    )
                    return result
                except NotFound:
                    raise
                except EngineError:
                    # Engines before API 1.41 refuse one-shot; their stats take a second.
                    self._one_shot = False
            result = await self.engine.run(api.stats, cid, stream=False)
            return result
        except EngineError:
            return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
