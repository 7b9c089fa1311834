"""Helpers for load-balancing and fault-tolerance tests: steerable backends, who served what,
Portico's health log, and reloads.

``Steerable`` is a raw backend (``behaviours.switchable``) whose answers the test changes while
it runs: the status of ordinary requests, the status of the health path (fixed, or a function
of the check number, to flap), and requests to ``/slow...`` held until released. Every answer
names the backend in ``X-Backend``; ``served_by`` reads that, or the ``instance`` of the Flask
example app's ``/whoami``, so one helper tells raw and gunicorn backends apart.
"""

from __future__ import annotations

import collections
import copy
import json
import signal
from collections.abc import Callable, Iterable
from typing import Any

from tests.support.backends import Handler, RawBackend
from tests.support.behaviours import Switchboard, switchable
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import Headers, RawConnection, RawResponse, build_request
from tests.support.tomlwriter import dumps
from tests.support.waiting import wait_until

# Seconds a client waits for any answer: far above every proxy timeout these tests configure,
# so a proxy that hangs fails the test instead of stalling it.
CLIENT_TIMEOUT = 5.0


class Steerable:
    """A ``switchable`` raw backend and its ``Switchboard`` (``.board``)."""

    def __init__(
        self, factory: Callable[[Handler], RawBackend], name: str, **controls: Any
    ) -> None:
        self.board = Switchboard(name, **controls)
        self.server = factory(switchable(self.board))

    def __repr__(self) -> str:
        return f"<Steerable {self.name} {self.url}>"

    @property
    def name(self) -> str:
        return self.board.name

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def label(self) -> str:
        """How Portico names this endpoint in its log: ``host:port``."""
        return f"{self.server.host}:{self.server.port}"


def fleet(
    factory: Callable[[Handler], RawBackend], *names: str, **controls: Any
) -> list[Steerable]:
    """One started ``Steerable`` per name, with the same initial controls."""
    return [Steerable(factory, name, **controls) for name in names]


def app_config(backends: list[Any], **upstream: Any) -> dict[str, Any]:
    """A Portico config with one upstream ``app`` over ``backends`` (URLs or backend tables),
    short upstream timeouts and a short shutdown grace; ``upstream`` adds or replaces keys of
    ``[upstreams.app]`` (``health``, ``retry``, ``balancer``...)."""
    return {
        "server": {"shutdown_grace": 0.5},
        "upstreams": {
            "app": {
                "backends": backends,
                "timeouts": {"connect": 1.0, "response_header": 5.0},
                **upstream,
            }
        },
    }


# --- requests and who served them ---------------------------------------------------------------


def request(
    port: int,
    method: str = "GET",
    target: str = "/",
    headers: Headers = (),
    body: bytes = b"",
    timeout: float = CLIENT_TIMEOUT,
) -> RawResponse:
    """One request on a fresh connection to Portico, and its response."""
    with RawConnection(port, timeout=timeout) as conn:
        return conn.request(method, target, headers, body)


def served_by(resp: RawResponse) -> str:
    """The backend that produced ``resp``: ``X-Backend``, else the Flask app's instance name."""
    name = resp.header("X-Backend")
    if name is not None:
        return name
    if resp.status == 200 and resp.header("content-type") == "application/json":
        instance = json.loads(resp.body).get("instance")
        if isinstance(instance, str):
            return instance
    raise AssertionError(f"cannot tell who served {resp.status} {resp.raw[:300]!r}")


def spread(port: int, n: int, target: str = "/", headers: Headers = ()) -> collections.Counter[str]:
    """Send ``n`` GETs one after another; count the 200 answers per backend. Any other status
    fails the caller's test at once."""
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        resp = request(port, "GET", target, headers)
        assert resp.status == 200, resp.raw[:300]
        counts[served_by(resp)] += 1
    return counts


# --- Portico's log --------------------------------------------------------------------------------


def log_lines(proxy: PorticoProcess, *needles: str) -> list[str]:
    """Lines of Portico's output that contain every one of ``needles``."""
    return [line for line in proxy.output().splitlines() if all(n in line for n in needles)]


def wait_for_log(
    proxy: PorticoProcess, *needles: str, count: int = 1, timeout: float = 5.0
) -> list[str]:
    """Wait until ``count`` lines contain all ``needles``; return the matching lines."""
    return wait_until(
        lambda: (found := log_lines(proxy, *needles)) and len(found) >= count and found,
        timeout,
        message=f"{count} log line(s) with {needles!r}",
    )


def health_transitions(proxy: PorticoProcess, label: str) -> list[str]:
    """The UP/DOWN transitions logged for endpoint ``label``, oldest first, each as the text
    after the label (``"DOWN after 3 failed checks: status 500"``)."""
    found = []
    for line in log_lines(proxy, f" {label} "):
        rest = line.split(f" {label} ", 1)[1]
        if rest.startswith(("UP after", "DOWN after")):
            found.append(rest)
    return found


# --- reloads -------------------------------------------------------------------------------------


def reload_with(proxy: PorticoProcess, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite Portico's config file with ``change`` applied, SIGHUP it, and wait until it has
    logged the reload (counted, so an earlier reload's line does not count)."""
    done = len(log_lines(proxy, "reloaded"))
    data = copy.deepcopy(proxy.config)
    change(data)
    proxy.config_path.write_text(dumps(data))
    proxy.process.signal(signal.SIGHUP)
    wait_for_log(proxy, "reloaded", count=done + 1)


def backends_of(urls: Iterable[str | dict[str, Any]]) -> Callable[[dict[str, Any]], None]:
    """A ``reload_with`` change that sets upstream ``app``'s backends."""
    items = list(urls)

    def change(data: dict[str, Any]) -> None:
        data["upstreams"]["app"]["backends"] = items

    return change


def hold_slow_request(
    proxy_port: int, backends: list[Steerable], target: str = "/slow/report"
) -> tuple[RawConnection, Steerable, list[Steerable]]:
    """Send one request the serving backend holds until ``board.release`` is set.

    Returns the client connection (the caller closes it), the backend holding the request and
    the others, so a test can check where the next requests go while one backend is busy.
    """
    slow = RawConnection(proxy_port, timeout=CLIENT_TIMEOUT)
    slow.send(build_request("GET", target))
    wait_until(
        lambda: sum(s.board.served("/slow") for s in backends) == 1,
        message="the slow request held by a backend",
    )
    [busy] = [s for s in backends if s.board.served("/slow")]
    return slow, busy, [s for s in backends if s is not busy]
