"""Discovery: an upstream whose endpoints are the running containers carrying some labels
(a compose project's service, or any selector), followed live from the engine's events.

Theory of operation. Per container the watcher keeps one ``Member``:

* admit (``start`` event, ``health_status: healthy``, or found by a resync): inspect the
  container, work out its address (``address_of``), wait for Docker's own health check if the
  image has one, then probe ``ready_path`` until it answers 200-399; only then does the
  endpoint join ``Service.endpoints``, copy-on-write, as the supervisor does it;
* drain (``kill`` with a stopping signal, ``stop``, ``health_status: unhealthy``): the
  endpoint is marked draining (balancers skip it) and leaves once its in-flight requests
  reach 0 or ``drain_timeout`` passes; a ``docker stop`` therefore takes a container out of
  rotation when the engine signals it, not when it is already gone;
* remove (``die``, ``destroy``): the endpoint leaves at once (retries send its in-flight
  idempotent requests elsewhere).

A resync after every (re)connection of the events stream lists the matching running
containers, admits the new ones and removes the vanished ones, so nothing missed while the
stream was down stays wrong.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any

from portico.config.model import Discover, HealthCheck
from portico.control.draining import wait_drained
from portico.control.engine import Engine, EngineError, NotFound
from portico.control.prober import check_once
from portico.policy.health import parse_statuses
from portico.runtime import membership
from portico.runtime.endpoint import Endpoint
from portico.runtime.events import EventLog
from portico.runtime.snapshot import Service

log = logging.getLogger("portico.discovery")

# Seconds between readiness probes of a container that has just started.
READY_INTERVAL = 0.1
# Back-off between attempts to reach an engine that is not up yet.
CONNECT_RETRY_MIN = 0.5
CONNECT_RETRY_MAX = 10.0
# Signals after which a container is on its way out (INT, QUIT, KILL, TERM); others, such as
# HUP for a config reload, leave it in rotation.
STOPPING_SIGNALS = frozenset({"2", "3", "9", "15", "SIGINT", "SIGQUIT", "SIGKILL", "SIGTERM"})
PORT_LABEL = "portico.port"


def address_of(info: dict[str, Any], spec: Discover) -> tuple[str, int] | str:
    """Where a container serves, from its inspect data: (host, port), or why it cannot be
    reached. Host networking: 127.0.0.1 and its ``portico.port`` label (else ``port``).
    Otherwise: its IP on ``network`` (else its only, or first, network) and ``port``."""
    labels = (info.get("Config") or {}).get("Labels") or {}
    mode = (info.get("HostConfig") or {}).get("NetworkMode") or ""
    label_port = labels.get(PORT_LABEL, "")
    port = int(label_port) if label_port.isdigit() else spec.port
    if port is None:
        return f"no {PORT_LABEL} label and no discover.port"
    if mode == "host":
        return "127.0.0.1", port
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    if spec.network is not None:
        chosen = networks.get(spec.network)
        if chosen is None:
            return f"not on network {spec.network!r} (on: {', '.join(networks) or 'none'})"
        candidates = [chosen]
    else:
        candidates = [networks[name] for name in sorted(networks)]
    for net in candidates:
        ip = (net or {}).get("IPAddress")
        if ip:
            return ip, port
    return f"no IP address (network mode {mode or 'unknown'!r})"


class Phase(enum.Enum):
    PENDING = "pending"  # inspecting, waiting for Docker's health check, or probing
    READY = "ready"
    DRAINING = "draining"


class Member:
    __slots__ = ("cid", "endpoint", "name", "phase", "task")

    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.name = cid[:12]
        self.phase = Phase.PENDING
        self.endpoint: Endpoint | None = None
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Member {self.name} {self.phase.value}>"


class Discovery:
    """Keeps one upstream's endpoints equal to its selector's ready, running containers."""

    def __init__(
        self,
        name: str,
        spec: Discover,
        service_of: Callable[[], Service],
        events: EventLog,
    ) -> None:
        self.name = name
        self.spec = spec
        self.service_of = service_of
        self.events = events
        self.engine = Engine(spec.docker_host)
        self.drain_settle = 0.0  # see control.draining.wait_drained
        self.members: dict[str, Member] = {}
        self._selector = spec.selector()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._check = (
            HealthCheck(path=spec.ready_path, timeout=min(2.0, spec.ready_timeout))
            if spec.ready_path is not None
            else None
        )
        self._statuses = parse_statuses("200-399")

    def __repr__(self) -> str:
        return f"<Discovery {self.name} {self._selector}>"

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._connect(), name=f"discover {self.name}"
        )

    async def stop(self) -> None:
        for task in [self._task, *self._tasks, *(m.task for m in self.members.values())]:
            if task is not None:
                task.cancel()
        self.members.clear()
        self.engine.close()

    async def _connect(self) -> None:
        """Reach the engine and subscribe, retrying while it is down (Portico may start
        before Docker does); the feed then keeps itself connected."""
        delay = CONNECT_RETRY_MIN
        filters = {
            "type": "container",
            "label": [f"{k}={v}" for k, v in sorted(self._selector.items())],
        }
        while True:
            try:
                await self.engine.open()
                await self.engine.feed(filters, self._on_event, self._resync).start()
            except EngineError as exc:
                log.warning("discover %s: %s; retrying in %gs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(CONNECT_RETRY_MAX, delay * 2)
                continue
            log.info("discover %s: following containers with %s", self.name, self._selector)
            return

    # --- engine events ------------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        said = str(event.get("Action") or event.get("status") or "")
        # "health_status: healthy" on most engines; spaces dropped so any spelling matches.
        action = said.replace(" ", "")
        actor = event.get("Actor") or {}
        cid = str(actor.get("ID") or event.get("id") or "")
        attributes = actor.get("Attributes") or {}
        if not cid or not self._matches(attributes):
            return
        if action in ("start", "health_status:healthy", "unpause"):
            self._admit(cid)
        elif action == "kill" and str(attributes.get("signal")) in STOPPING_SIGNALS:
            self._drain(cid, "stopping")
        elif action in ("stop", "pause", "health_status:unhealthy"):
            self._drain(cid, said)
        elif action in ("die", "destroy"):
            self._remove(cid, "exited" if action == "die" else "removed")

    def _matches(self, labels: dict[str, Any]) -> bool:
        # The engine filtered already; checked again because event attributes are the
        # container's labels, and a filter is only as good as the engine's version of it.
        return all(labels.get(k) == v for k, v in self._selector.items())

    def _resync(self) -> None:
        self._spawn(self._resync_now())

    async def _resync_now(self) -> None:
        filters = {
            "status": "running",
            "label": [f"{k}={v}" for k, v in sorted(self._selector.items())],
        }
        try:
            found = await self.engine.run(self.engine.client.api.containers, filters=filters)
        except EngineError as exc:
            log.warning("discover %s: cannot list containers: %s", self.name, exc)
            return
        running = {info["Id"] for info in found}
        for cid in list(self.members):
            if cid not in running:
                self._remove(cid, "gone")
        for cid in sorted(running):
            self._admit(cid)

    # --- members ------------------------------------------------------------------------

    def _admit(self, cid: str) -> None:
        member = self.members.get(cid)
        if member is not None and member.phase is not Phase.DRAINING:
            return  # already on its way in, or in
        if member is not None:
            self._remove(cid, "restarted")
        member = Member(cid)
        self.members[cid] = member
        member.task = asyncio.get_running_loop().create_task(self._bring_in(member))

    async def _bring_in(self, member: Member) -> None:
        try:
            info = await self.engine.run(self.engine.client.api.inspect_container, member.cid)
        except NotFound:
            self._forget(member)
            return
        except EngineError as exc:
            log.warning("discover %s: cannot inspect %s: %s", self.name, member.name, exc)
            self._forget(member)
            return
        member.name = str(info.get("Name") or member.name).lstrip("/")
        state = info.get("State") or {}
        health = (state.get("Health") or {}).get("Status")
        if not state.get("Running") or health in ("starting", "unhealthy"):
            # Not yet: a start or health_status: healthy event brings it back.
            self._forget(member)
            return
        address = address_of(info, self.spec)
        if isinstance(address, str):
            log.warning("discover %s: leaving out %s: %s", self.name, member.name, address)
            self._forget(member)
            return
        if self._check is not None and not await self._probe(member, *address):
            self._forget(member)
            return
        self._join(member, *address)

    async def _probe(self, member: Member, host: str, port: int) -> bool:
        assert self._check is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.ready_timeout
        reason = "not probed"
        while loop.time() < deadline:
            result = await check_once(host, port, self._check, self._statuses)
            if result.ok:
                return True
            reason = result.reason
            await asyncio.sleep(READY_INTERVAL)
        message = (
            f"{member.name} not ready after {self.spec.ready_timeout:g}s ({reason}):"
            " left out until it starts again"
        )
        self.events.add(self.name, "crash", message)
        log.warning("discover %s: %s", self.name, message)
        return False

    def _join(self, member: Member, host: str, port: int) -> None:
        service = self.service_of()
        ep = Endpoint(host, port)
        member.endpoint = ep
        member.phase = Phase.READY
        member.task = None
        membership.join(service, ep, asyncio.get_running_loop().time())
        self.events.add(self.name, "ready", f"{member.name} joined as {ep.label}")
        log.info("discover %s: %s ready at %s", self.name, member.name, ep.label)

    def _drain(self, cid: str, why: str) -> None:
        member = self.members.get(cid)
        if member is None or member.phase is Phase.DRAINING:
            return
        if member.endpoint is None:  # still pending: nothing to drain
            self._remove(cid, why)
            return
        member.phase = Phase.DRAINING
        membership.drain(member.endpoint)
        self.events.add(self.name, "drain", f"{member.name} draining ({why})")
        log.info("discover %s: %s draining (%s)", self.name, member.name, why)
        member.task = asyncio.get_running_loop().create_task(self._drained(member))

    async def _drained(self, member: Member) -> None:
        ep = member.endpoint
        assert ep is not None
        await wait_drained(ep, self.spec.drain_timeout, self.drain_settle)
        member.task = None
        if self.members.get(member.cid) is member:
            self._remove(member.cid, "drained")

    def _remove(self, cid: str, why: str) -> None:
        member = self.members.pop(cid, None)
        if member is None:
            return
        if member.task is not None and member.task is not asyncio.current_task():
            member.task.cancel()
        ep = member.endpoint
        if ep is not None:
            member.endpoint = None
            membership.leave(self.service_of(), ep)
            self.events.add(self.name, "stop", f"{member.name} left ({why})")
            log.info("discover %s: %s left (%s)", self.name, member.name, why)

    def _forget(self, member: Member) -> None:
        if self.members.get(member.cid) is member:
            del self.members[member.cid]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
