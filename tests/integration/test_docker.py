"""Containers against a real Docker Engine: the Docker provider and compose discovery.

A private ``dockerd`` (tests/support/docker.py) runs for the session, with its own data root
and socket and no network changes; containers use host networking on 127.0.0.1. Where the
engine cannot start (not root, no dockerd, no busybox-static), every test here is skipped
with the reason.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import PorticoFactory
from tests.support.docker import IMAGE, DockerDaemon, EngineUnavailable
from tests.support.ports import free_port
from tests.support.waiting import wait_until

# Seconds a container fleet gets to come up or settle: far above the second or two it takes.
SETTLE = 20.0


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[DockerDaemon]:
    daemon = DockerDaemon()
    try:
        daemon.start()
    except EngineUnavailable as exc:
        daemon.stop()
        pytest.skip(f"no Docker Engine for the container tests: {exc}")
    except BaseException:
        daemon.stop()  # a bug of ours: cleaned up, and reported as the error it is
        raise
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def engine(docker_daemon: DockerDaemon) -> Iterator[DockerDaemon]:
    """The session's engine, with every container removed after each test."""
    yield docker_daemon
    docker_daemon.remove_all()


# --- helpers ----------------------------------------------------------------------------------


class Traffic:
    """A client thread sending GETs through Portico one after another, recording each answer
    (the body: who served it) or the error."""

    def __init__(self, url: str, path: str = "/cgi-bin/whoami") -> None:
        self.url = url + path
        self.served: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            while not self._stop.is_set():
                try:
                    r = client.get(self.url)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if r.status_code == 200:
                    self.served.append(r.text.strip())
                else:
                    self.failures.append(f"{r.status_code} {r.text[:80]!r}")
                time.sleep(0.005)

    def seen_since(self, mark: int) -> set[str]:
        return set(self.served[mark:])


def who_answers(url: str, tries: int = 30, host: str | None = None) -> set[str]:
    """The instances that served ``tries`` sequential requests (round robin visits all)."""
    seen: set[str] = set()
    headers = {"Host": host} if host else {}
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        for _ in range(tries):
            r = client.get(url + "/cgi-bin/whoami", headers=headers)
            if r.status_code == 200:
                seen.add(r.text.strip())
    return seen


def app_config(engine: DockerDaemon, **app: Any) -> dict[str, Any]:
    docker = {
        "image": IMAGE,
        "command": ["/bin/serve", "{port}"],
        "env": {"STOP_DELAY": "0.2"},
        "docker_host": engine.url,
        **app.pop("docker", {}),
    }
    settings = {
        "min": 2,
        "max": 2,
        "ready_interval": 0.05,
        "stop_timeout": 3,
        "drain_timeout": 5,
        "backoff_initial": 0.1,
        "docker": docker,
        **app,
    }
    return {
        "server": {"shutdown_grace": 5},
        "upstreams": {"web": {"app": settings, "retry": {"attempts": 3}}},
    }


def running(engine: DockerDaemon, app: str = "web") -> list[Any]:
    return engine.containers({"portico.managed": "1", "portico.app": app})


def every(engine: DockerDaemon, app: str = "web") -> list[Any]:
    """Running or not: duplicates and leftovers show here."""
    return engine.containers({"portico.managed": "1", "portico.app": app}, all=True)


def until(predicate: Callable[[], Any], message: str, timeout: float = SETTLE) -> Any:
    return wait_until(predicate, timeout=timeout, interval=0.1, message=message)


# --- the provider -------------------------------------------------------------------------


def test_containers_start_take_traffic_and_a_killed_one_is_healed(
    portico: PorticoFactory, engine: DockerDaemon
) -> None:
    proxy = portico(app_config(engine))
    until(lambda: who_answers(proxy.url) == {"web-1", "web-2"}, "both instances to serve")
    containers = running(engine)
    assert len(containers) == 2
    for c in containers:
        labels = c["Labels"]
        assert labels["portico.managed"] == "1"
        assert labels["portico.app"] == "web"
        assert labels["portico.instance"] in ("web-1", "web-2")
        assert labels["portico.port"].isdigit()
        assert c["HostConfig"]["NetworkMode"] == "host"

    with Traffic(proxy.url) as traffic:
        until(lambda: len(traffic.served) > 20, "traffic to flow")
        victim = next(c for c in containers if c["Labels"]["portico.instance"] == "web-1")
        engine.client.api.kill(victim["Id"])  # SIGKILL: no grace; connections refused
        until(lambda: "web-3" in traffic.served, "a replacement to take traffic")
        mark = len(traffic.served)
        until(lambda: len(traffic.served) > mark + 20, "more traffic")
    assert traffic.failures == []
    assert traffic.seen_since(mark) == {"web-2", "web-3"}
    # The dead container was cleared away, not left to pile up.
    until(lambda: len(every(engine)) == 2, "the killed container to be removed")
    assert "[web-1]" in proxy.output() or "web-1 exited" in proxy.output()


def test_rolling_restart_replaces_every_container_without_errors(
    portico: PorticoFactory, engine: DockerDaemon
) -> None:
    proxy = portico(app_config(engine))
    until(lambda: who_answers(proxy.url) == {"web-1", "web-2"}, "both instances to serve")
    before = {c["Id"] for c in running(engine)}
    with Traffic(proxy.url) as traffic:
        until(lambda: len(traffic.served) > 20, "traffic to flow")
        proxy.process.signal(signal.SIGUSR1)

        def replaced() -> bool:
            now = {c["Id"] for c in every(engine)}
            return len(now) == 2 and not now & before

        until(replaced, "both containers to be replaced")
        mark = len(traffic.served)
        until(lambda: len(traffic.served) > mark + 20, "more traffic")
    assert traffic.failures == []
    assert traffic.seen_since(mark) == {"web-3", "web-4"}


def test_autoscaler_scales_containers_up_and_down(
    portico: PorticoFactory, engine: DockerDaemon
) -> None:
    autoscale = {
        "metric": "in_flight",
        "target": 1,
        "interval": 0.5,
        "scale_down_window": 1,
        "cooldown": 0.5,
    }
    proxy = portico(app_config(engine, min=1, max=3, autoscale=autoscale))
    until(lambda: who_answers(proxy.url) == {"web-1"}, "one instance to serve")
    stop = threading.Event()
    failures: list[str] = []

    def load() -> None:  # one slow request at a time per thread: in-flight = threads
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            while not stop.is_set():
                r = client.get(proxy.url + "/cgi-bin/slow?0.5")
                if r.status_code != 200:
                    failures.append(str(r.status_code))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        until(lambda: len(running(engine)) == 3, "scale up to 3 containers")
        until(lambda: who_answers(proxy.url, 40) == {"web-1", "web-2", "web-3"}, "3 serving")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert failures == []
    until(lambda: len(every(engine)) == 1, "scale down to 1 container")
    assert "scale web 1 -> 3" in proxy.output() or "scale web 2 -> 3" in proxy.output()


def test_restarted_portico_adopts_its_containers_and_shutdown_removes_them(
    portico: PorticoFactory, engine: DockerDaemon
) -> None:
    config = app_config(engine)
    first = portico(config)
    until(lambda: who_answers(first.url) == {"web-1", "web-2"}, "both instances to serve")
    before = {c["Id"] for c in running(engine)}
    first.stop(signal.SIGKILL, timeout=5)  # no shutdown at all: the containers stay
    assert {c["Id"] for c in running(engine)} == before

    second = portico(config)
    until(lambda: who_answers(second.url) == {"web-1", "web-2"}, "the adopted instances")
    assert {c["Id"] for c in every(engine)} == before  # adopted, none duplicated
    assert "adopted container" in second.output()

    second.stop()  # SIGTERM: drain, stop, remove
    assert every(engine) == []


def test_keep_leaves_containers_running_for_the_next_portico(
    portico: PorticoFactory, engine: DockerDaemon
) -> None:
    config = app_config(engine, min=1, max=1, docker={"keep": True})
    first = portico(config)
    until(lambda: who_answers(first.url) == {"web-1"}, "the instance to serve")
    (kept,) = running(engine)
    first.stop()
    assert [c["Id"] for c in running(engine)] == [kept["Id"]]
    assert "left running" in first.output()

    second = portico(config)
    until(lambda: who_answers(second.url) == {"web-1"}, "the adopted instance")
    assert [c["Id"] for c in every(engine)] == [kept["Id"]]


def test_supervisor_scales_through_the_provider(engine: DockerDaemon) -> None:
    from portico.config.model import Config
    from portico.control.providers.docker import DockerProvider
    from portico.control.supervisor import Supervisor
    from portico.runtime.events import EventLog
    from portico.runtime.snapshot import compile_config

    config = Config.model_validate(app_config(engine, min=1, max=3))
    spec = config.upstreams["web"].app
    assert spec is not None
    snapshot = compile_config(config)
    service = snapshot.services["web"]

    async def scenario() -> None:
        provider = DockerProvider(engine.url)
        sup = Supervisor("web", spec, provider, lambda: service, EventLog())
        sup.start()
        try:
            await poll(lambda: len(sup.ready) == 1, "one ready")
            sup.set_desired(3)
            await poll(lambda: len(sup.ready) == 3 and len(running(engine)) == 3, "three")
            ports = {ep.port for ep in service.endpoints}
            assert ports == {int(c["Labels"]["portico.port"]) for c in running(engine)}
            sup.set_desired(1)
            await poll(lambda: len(sup.instances) == 1 and len(every(engine)) == 1, "one left")
            assert len(service.endpoints) == 1
        finally:
            await sup.stop()
            provider.close()
        assert every(engine) == []

    asyncio.run(scenario())


def test_container_cpu_comes_from_its_stats(engine: DockerDaemon) -> None:
    from portico.config.model import App
    from portico.control.providers.docker import DockerProvider

    spec = App.model_validate(
        {"docker": {"image": IMAGE, "command": ["/bin/spin"], "docker_host": engine.url}}
    )

    async def scenario() -> float:
        provider = DockerProvider(engine.url)
        instance = await provider.start("cpu", spec, "cpu-1")
        try:
            instance.cpu_percent()  # first sample
            await poll(lambda: instance._sample is not None, "a first sample")
            await asyncio.sleep(0.5)
            instance.cpu_percent()  # second sample: a value from now on
            await poll(lambda: instance.cpu_percent() > 0, "a CPU value")
            return instance.cpu_percent()
        finally:
            await provider.stop(instance, 2)
            provider.close()

    assert asyncio.run(scenario()) > 1.0  # a busy loop, however busy the machine is
    assert engine.containers({"portico.app": "cpu"}, all=True) == []


async def poll(predicate: Callable[[], bool], message: str, timeout: float = SETTLE) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for: {message}")
        await asyncio.sleep(0.05)


# --- discovery --------------------------------------------------------------------------------


def compose_replica(engine: DockerDaemon, service: str, n: int, project: str = "shop") -> Any:
    """A container as ``docker compose up --scale`` would label it, on a host port of its own."""
    port = free_port()
    name = f"{project}-{service}-{n}"
    labels = {
        "com.docker.compose.project": project,
        "com.docker.compose.service": service,
        "com.docker.compose.container-number": str(n),
        "portico.port": str(port),
    }
    env = {"PORTICO_INSTANCE": name, "STOP_DELAY": "0.3"}
    return engine.run(["/bin/serve", str(port)], labels=labels, env=env, name=name)


def test_compose_service_scaled_from_outside_is_followed_live(
    portico: PorticoFactory, engine: DockerDaemon
) -> None:
    app1 = compose_replica(engine, "app", 1)
    app2 = compose_replica(engine, "app", 2)
    compose_replica(engine, "db", 1)  # same project, other service: never a backend
    compose_replica(engine, "app", 1, project="other")  # other project: never a backend
    config = {
        "server": {"shutdown_grace": 5},
        "upstreams": {
            "shop": {
                "discover": {
                    "compose_project": "shop",
                    "compose_service": "app",
                    "drain_timeout": 5,
                },
            }
        },
    }
    proxy = portico(config, env={"DOCKER_HOST": engine.url})  # the default engine
    until(lambda: who_answers(proxy.url) == {"shop-app-1", "shop-app-2"}, "both replicas")

    with Traffic(proxy.url) as traffic:
        until(lambda: len(traffic.served) > 20, "traffic to flow")
        compose_replica(engine, "app", 3)  # --scale app=3
        until(lambda: "shop-app-3" in traffic.served, "the new replica to take traffic")

        app1.stop(timeout=5)  # --scale app=2: drained when signalled, gone when it exits
        until(lambda: "shop-app-1 left" in proxy.output(), "the stopped replica to leave")
        mark = len(traffic.served)
        until(lambda: len(traffic.served) > mark + 30, "more traffic")
        assert traffic.seen_since(mark) == {"shop-app-2", "shop-app-3"}

        app2.kill()  # a crash, no grace: retries cover the refused connections
        until(lambda: "shop-app-2 left" in proxy.output(), "the killed replica to leave")
        mark = len(traffic.served)
        until(lambda: len(traffic.served) > mark + 20, "more traffic")
        assert traffic.seen_since(mark) == {"shop-app-3"}
    assert traffic.failures == []
    assert "shop-db-1" not in traffic.served
    assert "other-app-1" not in traffic.served
    # `docker stop` drained the replica before it left: its SIGTERM was seen, not only its exit.
    output = proxy.output()
    assert "shop-app-1 draining (stopping)" in output
    assert output.index("shop-app-1 draining (stopping)") < output.index("shop-app-1 left")


def test_label_selector_with_a_given_port(portico: PorticoFactory, engine: DockerDaemon) -> None:
    port = free_port()
    engine.run(
        ["/bin/serve", str(port)],
        labels={"team": "blue"},
        env={"PORTICO_INSTANCE": "blue-1"},
        name="blue-1",
    )
    config = {
        "upstreams": {
            "blue": {"discover": {"labels": {"team": "blue"}, "port": port}},
        },
    }
    proxy = portico(config, env={"DOCKER_HOST": engine.url})
    until(lambda: who_answers(proxy.url, 5) == {"blue-1"}, "the labelled container")


def test_docker_health_status_gates_and_drains_a_container(
    portico: PorticoFactory, engine: DockerDaemon
) -> None:
    port = free_port()
    container = engine.client.containers.run(
        IMAGE,
        ["/bin/serve", str(port)],
        detach=True,
        network_mode="host",
        labels={"team": "green", "portico.port": str(port)},
        environment={"PORTICO_INSTANCE": "green-1"},
        name="green-1",
        # Healthy while /tmp/healthy exists; checked every 0.1 s, one failure is enough.
        healthcheck={
            "test": ["CMD", "/bin/test", "-f", "/tmp/healthy"],
            "interval": 100_000_000,
            "retries": 1,
        },
    )
    config = {"upstreams": {"green": {"discover": {"labels": {"team": "green"}}}}}
    proxy = portico(config, env={"DOCKER_HOST": engine.url})
    until(lambda: "following containers" in proxy.output(), "discovery to subscribe")
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        assert client.get(proxy.url + "/cgi-bin/whoami").status_code == 503  # not healthy yet

        container.exec_run(["/bin/touch", "/tmp/healthy"])
        until(lambda: who_answers(proxy.url, 3) == {"green-1"}, "healthy: in rotation")

        container.exec_run(["/bin/rm", "/tmp/healthy"])
        until(lambda: "green-1 left" in proxy.output(), "unhealthy: drained and out")
        assert client.get(proxy.url + "/cgi-bin/whoami").status_code == 503
    assert "green-1 draining (health_status: unhealthy)" in proxy.output()
