"""Active health checks: ask every endpoint of every checked upstream, on a timer.

One task per (upstream, endpoint). Each check opens a fresh connection, sends one request,
parses the answer with the project's own strict codec and reports pass or fail with a reason
to the endpoint's ``HealthTracker``; only a rise/fall transition reaches ``on_transition``.
The prober runs once per gateway (in the master when there are several workers), never per
worker, and knows nothing of how transitions are applied or published.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from portico.codec.events import Data, EndOfMessage, ResponseHead
from portico.codec.parser import ResponseParser
from portico.config.model import HealthCheck
from portico.dataplane.backendtls import client_context, tls_reason
from portico.errors import BadResponse
from portico.policy.health import (
    HealthTracker,
    StatusSet,
    Transition,
    next_interval,
    parse_statuses,
)
from portico.runtime.endpoint import Endpoint
from portico.runtime.snapshot import Snapshot
from portico.runtime.tlstarget import TlsTarget

log = logging.getLogger("portico.health")

# Body bytes kept for the expect_body test; health pages are small, and a check must not be
# a way to make Portico hold a large body.
MAX_CHECK_BODY = 65536

OnTransition = Callable[[str, Endpoint, Transition], None]
OnPass = Callable[[str, Endpoint], None]


@dataclass(slots=True)
class CheckResult:
    ok: bool
    reason: str


async def check_once(
    host: str, port: int, spec: HealthCheck, statuses: StatusSet, tls: TlsTarget | None = None
) -> CheckResult:
    """One check: connect, ask, judge. Never raises for a sick backend; reports why.
    ``tls``: the check speaks TLS, verified as requests are (an https:// backend)."""
    try:
        async with asyncio.timeout(spec.timeout):
            return await _exchange(host, port, spec, statuses, tls)
    except TimeoutError:
        return CheckResult(False, f"timed out after {spec.timeout:g}s")
    except ConnectionRefusedError:
        return CheckResult(False, "connect refused")
    except BadResponse as exc:
        return CheckResult(False, exc.reason)
    except OSError as exc:
        return CheckResult(False, tls_reason(exc))


async def _exchange(
    host: str, port: int, spec: HealthCheck, statuses: StatusSet, tls: TlsTarget | None
) -> CheckResult:
    if tls is None:
        reader, writer = await asyncio.open_connection(host, port)
    else:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=client_context(tls), server_hostname=tls.server_name
        )
    try:
        authority = spec.host or (tls.server_name if tls else f"{host}:{port}")
        writer.write(
            f"{spec.method} {spec.path} HTTP/1.1\r\nHost: {authority}\r\n"
            "User-Agent: portico-health-check\r\nConnection: close\r\n\r\n".encode("latin-1")
        )
        parser = ResponseParser()
        parser.expect(spec.method.encode())
        status = 0
        body = bytearray()
        while True:
            data = await reader.read(65536)
            events = parser.feed(data) if data else parser.feed_eof()
            for ev in events:
                if isinstance(ev, ResponseHead) and not ev.informational:
                    status = ev.status
                elif isinstance(ev, Data) and len(body) < MAX_CHECK_BODY:
                    body += ev.data[: MAX_CHECK_BODY - len(body)]
                elif isinstance(ev, EndOfMessage):
                    return _judge(status, bytes(body), spec, statuses)
            if not data:
                raise BadResponse("connection closed before a response")
    finally:
        writer.close()


def _judge(status: int, body: bytes, spec: HealthCheck, statuses: StatusSet) -> CheckResult:
    if status not in statuses:
        return CheckResult(False, f"status {status}")
    if spec.expect_body is not None and spec.expect_body.encode() not in body:
        return CheckResult(False, f"body lacks {spec.expect_body!r}")
    return CheckResult(True, f"status {status}")


class Prober:
    """Owns the check tasks; ``update`` reconciles them with a (new) snapshot."""

    def __init__(
        self,
        on_transition: OnTransition,
        rng: random.Random | None = None,
        on_pass: OnPass | None = None,
    ) -> None:
        self._on_transition = on_transition
        # Every passing check of an endpoint considered healthy: ends an outlier ejection.
        self._on_pass = on_pass
        self._rng = rng or random.Random()
        self._tasks: dict[tuple[str, tuple[str, int]], asyncio.Task[None]] = {}
        self._specs: dict[tuple[str, tuple[str, int]], HealthCheck] = {}

    def update(self, snapshot: Snapshot) -> None:
        wanted: dict[tuple[str, tuple[str, int]], tuple[Endpoint, HealthCheck]] = {}
        for name, service in snapshot.services.items():
            if service.health is None:
                continue
            for ep in service.endpoints:
                wanted[(name, ep.address)] = (ep, service.health)
        for key in list(self._tasks):
            if key not in wanted or self._specs[key] != wanted[key][1]:
                self._tasks.pop(key).cancel()
                self._specs.pop(key)
        for key, (ep, spec) in wanted.items():
            if key not in self._tasks:
                self._specs[key] = spec
                self._tasks[key] = asyncio.get_running_loop().create_task(
                    self._run(key[0], ep, spec), name=f"health {key[0]} {ep.label}"
                )

    async def _run(self, upstream: str, ep: Endpoint, spec: HealthCheck) -> None:
        statuses = parse_statuses(spec.expect_status)
        tracker = HealthTracker(spec.rise, spec.fall, healthy=ep.up)
        loop = asyncio.get_running_loop()
        while True:
            result = await check_once(ep.host, ep.port, spec, statuses, ep.tls)
            transition = tracker.observe(result.ok, result.reason, loop.time())
            if transition is not None:
                self._on_transition(upstream, ep, transition)
            if result.ok and tracker.healthy and self._on_pass is not None:
                self._on_pass(upstream, ep)
            base = spec.interval if tracker.healthy else (spec.unhealthy_interval or spec.interval)
            await asyncio.sleep(next_interval(base, spec.jitter, self._rng))

    def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        self._specs.clear()
