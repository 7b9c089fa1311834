"""Containers without an engine: the docker and discover config, where a discovered container
is reached, what makes a container adoptable, and CPU % from two stats samples."""

from __future__ import annotations

from typing import Any

import pytest

from portico.config.load import load_text
from portico.config.model import App, Discover
from portico.control.discovery import address_of
from portico.control.providers.docker import cpu_percent, spec_digest
from portico.errors import ConfigError

DOCKER_APP = """
[upstreams.web.app]
min = 2
[upstreams.web.app.docker]
image = "shop:1.4"
command = "gunicorn -b 0.0.0.0:{port} wsgi:app"
memory = "256MiB"
cpus = 0.5
"""


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_text(text)
    return info.value.problems


def test_docker_app_loads_with_host_networking_by_default() -> None:
    app = load_text(DOCKER_APP).upstreams["web"].app
    assert app is not None and app.docker is not None
    assert app.docker.network_mode == "host"
    assert app.docker.command == ["gunicorn", "-b", "0.0.0.0:{port}", "wsgi:app"]
    assert int(app.docker.memory or 0) == 256 * 2**20
    assert not app.keeps_instances


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ('command = ["x"]', "give exactly one of command, wsgi, asgi, docker or kubernetes"),
        ('cwd = "/srv"', "cwd does not apply to docker"),
    ],
)
def test_docker_app_excludes_other_ways_to_run(extra: str, reason: str) -> None:
    text = DOCKER_APP.replace("min = 2", f"min = 2\n{extra}")
    ((path, message),) = problems(text)
    assert path == "upstreams.web.app"
    assert reason in message


def test_port_belongs_to_networks_other_than_the_host() -> None:
    bridge = DOCKER_APP + 'network_mode = "bridge"\n'
    ((path, message),) = problems(bridge)
    assert path == "upstreams.web.app.docker"
    assert "needs the container's port" in message
    load_text(bridge + "port = 5000\n")
    ((_, message),) = problems(DOCKER_APP + "port = 5000\n")
    assert "with host networking use {port}" in message


def test_discover_needs_a_selector_and_excludes_backends() -> None:
    ((path, message),) = problems("[upstreams.a.discover]\nport = 5000\n")
    assert path == "upstreams.a.discover"
    assert "compose_project, compose_service or labels" in message
    text = (
        '[upstreams.a]\nbackends = ["http://127.0.0.1:1"]\n'
        '[upstreams.a.discover]\nlabels = {x = "1"}\n'
    )
    ((path, message),) = problems(text)
    assert path == "upstreams.a"
    assert "not backends and discover" in message


def test_discover_selector_adds_the_compose_labels() -> None:
    spec = Discover(compose_project="shop", compose_service="app", labels={"tier": "web"})
    assert spec.selector() == {
        "tier": "web",
        "com.docker.compose.project": "shop",
        "com.docker.compose.service": "app",
    }


def test_discover_and_apps_run_with_several_workers() -> None:
    # The master runs discovery and supervisors once and publishes endpoints to workers.
    text = (
        '[server]\nworkers = 2\nlisten = "127.0.0.1:9"\n'
        '[upstreams.a.discover]\nlabels = {x = "1"}\n'
        '[upstreams.b.app]\nwsgi = "app:app"\n'
        '[[routes]]\npath = "/a"\nupstream = "a"\n'
        '[[routes]]\nupstream = "b"\n'
    )
    config = load_text(text)
    assert config.server.workers == 2
    assert config.upstreams["a"].discover is not None and config.upstreams["b"].app is not None


def inspect(mode: str, labels: dict[str, str], networks: dict[str, str]) -> dict[str, Any]:
    return {
        "Config": {"Labels": labels},
        "HostConfig": {"NetworkMode": mode},
        "NetworkSettings": {"Networks": {n: {"IPAddress": ip} for n, ip in networks.items()}},
    }


def test_address_with_host_networking_comes_from_the_label_or_the_port() -> None:
    spec = Discover(labels={"a": "1"}, port=5000)
    assert address_of(inspect("host", {"portico.port": "8001"}, {}), spec) == ("127.0.0.1", 8001)
    assert address_of(inspect("host", {}, {}), spec) == ("127.0.0.1", 5000)
    reason = address_of(inspect("host", {}, {}), Discover(labels={"a": "1"}))
    assert reason == "no portico.port label and no discover.port"


def test_address_on_a_network_is_the_container_ip() -> None:
    info = inspect("shop_default", {}, {"shop_default": "172.18.0.3", "other": "10.0.0.9"})
    spec = Discover(compose_project="shop", port=5000)
    assert address_of(info, spec) == ("10.0.0.9", 5000)  # first by name, when not told
    spec = Discover(compose_project="shop", port=5000, network="shop_default")
    assert address_of(info, spec) == ("172.18.0.3", 5000)
    spec = Discover(compose_project="shop", port=5000, network="nope")
    assert "not on network 'nope'" in str(address_of(info, spec))


def test_spec_digest_follows_what_shapes_a_container() -> None:
    base = {"image": "shop:1", "command": ["serve", "{port}"]}
    one = App(docker=base)
    assert spec_digest(one) == spec_digest(App(docker=base, min=3, max=9))
    assert spec_digest(one) == spec_digest(App(docker={**base, "keep": True}))
    assert spec_digest(one) != spec_digest(App(docker={**base, "image": "shop:2"}))
    assert spec_digest(one) != spec_digest(App(docker=base, env={"MODE": "x"}))


def test_cpu_percent_as_docker_stats_computes_it() -> None:
    before = {"cpu_usage": {"total_usage": 1_000}, "system_cpu_usage": 10_000, "online_cpus": 4}
    after = {"cpu_usage": {"total_usage": 1_500}, "system_cpu_usage": 12_000, "online_cpus": 4}
    assert cpu_percent(before, after) == pytest.approx(100.0)  # a whole core of four
    assert cpu_percent(after, after) == 0.0
    assert cpu_percent({}, after) == 0.0


def test_discover_ready_path_empty_turns_the_probe_off() -> None:
    assert Discover(labels={"a": "1"}).ready_path == "/"
    assert Discover(labels={"a": "1"}, ready_path="").ready_path is None
    with pytest.raises(ValueError, match="must be a path"):
        Discover(labels={"a": "1"}, ready_path="health")
