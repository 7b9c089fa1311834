"""Config for what Portico runs or discovers itself: apps (processes, containers),
autoscaling and container discovery. Validated through ``portico.config.model.Config``."""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from portico.config.kube import KubeDeployment
from portico.config.types import Argv, NonNegSeconds, PositiveSeconds, Size, Strict


class Autoscale(Strict):
    """Target tracking, as Kubernetes' HPA and Knative do it."""

    metric: Literal["in_flight", "rps", "p95_latency", "cpu"] = Field(
        "in_flight", description="signal per instance: in-flight requests, req/s, p95 s, CPU %"
    )
    target: float = Field(4.0, gt=0, description="desired value of the metric per instance")
    interval: PositiveSeconds = Field(1.0, description="seconds between samples and decisions")
    scale_up_window: NonNegSeconds = Field(
        0.0, description="stabilisation: scale up to the lowest recommendation of this window"
    )
    scale_down_window: NonNegSeconds = Field(
        30.0, description="stabilisation: scale down to the highest recommendation of this window"
    )
    max_step: int = Field(4, ge=1, description="most instances added or removed in one decision")
    cooldown: NonNegSeconds = Field(5.0, description="least time between two scaling actions")
    idle_timeout: PositiveSeconds = Field(
        300.0, description="with min = 0: scale to zero after this long without requests"
    )


class DockerRun(Strict):
    """Instances as containers of an image, run by the Docker provider (``pip install
    portico[docker]``). With host networking (the default) a container listens on the port
    Portico gives it; on any other network it listens on ``port``, which Portico publishes on
    127.0.0.1 at a free port."""

    image: str = Field(min_length=1, description="image to run, e.g. 'myapp:1.4'")
    command: Argv | None = Field(
        None, description="argv; {port} is replaced; unset = the image's own command"
    )
    env: dict[str, str] = Field(default_factory=dict, description="added to app.env")
    port: int | None = Field(
        None, ge=1, le=65535, description="port the app listens on inside the container"
    )
    network_mode: str = Field(
        "host", min_length=1, description="'host', 'bridge' or a network name"
    )
    cpus: float | None = Field(None, gt=0, description="CPU limit, in cores (e.g. 0.5)")
    memory: Size | None = Field(None, description="memory limit, e.g. '256MiB'")
    ulimits: dict[Literal["nofile", "nproc", "core", "memlock", "stack"], int] = Field(
        default_factory=dict,
        description="resource limits in the container (soft = hard), e.g. {nofile = 4096};"
        " needed when the engine's defaults exceed the host's hard limits (Podman's do here)",
    )
    keep: bool = Field(
        False, description="leave the containers running when Portico stops (adopted next time)"
    )
    docker_host: str | None = Field(
        None, description="Docker Engine URL, e.g. unix:///run/docker.sock; unset = $DOCKER_HOST"
    )

    @model_validator(mode="after")
    def _port_off_host(self) -> DockerRun:
        if self.network_mode != "host" and self.port is None:
            raise ValueError(f"network_mode {self.network_mode!r} needs the container's port")
        if self.network_mode == "host" and self.port is not None:
            # On the host's network every instance needs a port of its own: Portico's {port}.
            raise ValueError("port is for other network modes; with host networking use {port}")
        return self

    @property
    def host_network(self) -> bool:
        return self.network_mode == "host"


class App(Strict):
    """Instances Portico runs itself. Each gets a free loopback port as {port} and $PORT."""

    command: Argv | None = Field(None, description="argv; {port} is replaced")
    wsgi: str | None = Field(None, description="module:app served by gunicorn")
    asgi: str | None = Field(None, description="module:app served by uvicorn")
    docker: DockerRun | None = Field(None, description="containers of an image instead")
    kubernetes: KubeDeployment | None = Field(
        None, description="the pods of a Kubernetes Deployment instead (Portico sets replicas)"
    )
    cwd: str | None = Field(None, description="working directory of the instances")
    env: dict[str, str] = Field(default_factory=dict)
    min: int = Field(1, ge=0, le=256)
    max: int = Field(4, ge=1, le=256)
    ready_path: str = Field("/", description="GET this; 200-399 means ready for traffic")
    ready_timeout: PositiveSeconds = Field(
        30.0, description="an instance not ready by then is failed"
    )
    ready_interval: PositiveSeconds = Field(0.1, description="time between readiness probes")
    drain_timeout: NonNegSeconds = Field(
        30.0, description="in-flight requests get this long before an instance is stopped"
    )
    stop_timeout: PositiveSeconds = Field(10.0, description="SIGTERM to SIGKILL")
    backoff_initial: PositiveSeconds = Field(0.5, description="first delay before a restart")
    backoff_max: PositiveSeconds = Field(30.0, description="longest delay between restarts")
    crash_loop_after: int = Field(
        5, ge=1, description="crashes in a row (each before ready or quick) that mean crash loop"
    )
    cold_start_timeout: PositiveSeconds = Field(
        30.0, description="with min = 0: how long the first request waits for an instance"
    )
    autoscale: Autoscale | None = Field(None, description="unset = a fixed count of min")

    @model_validator(mode="after")
    def _one_way_to_run(self) -> App:
        given = [k for k in ("command", "wsgi", "asgi", "docker", "kubernetes") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of command, wsgi, asgi, docker or kubernetes")
        if self.docker is not None and self.cwd is not None:
            raise ValueError("cwd does not apply to docker (the image sets its own)")
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is more than max ({self.max})")
        return self

    @property
    def keeps_instances(self) -> bool:
        """Instances outlive Portico's shutdown (a later Portico adopts them)."""
        return self.docker is not None and self.docker.keep

    def argv(self, port: int) -> list[str]:
        """The command line of one instance listening on ``port``."""

        if self.wsgi:
            return [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", self.wsgi]
        if self.asgi:
            module = self.asgi
            return [
                sys.executable,
                "-m",
                "uvicorn",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                module,
            ]
        assert self.command is not None
        return [part.replace("{port}", str(port)) for part in self.command]


class Discover(Strict):
    """Endpoints found in Docker: the running containers that carry every given label,
    followed live from the engine's events."""

    compose_project: str | None = Field(
        None, description="label com.docker.compose.project, e.g. the compose directory name"
    )
    compose_service: str | None = Field(
        None, description="label com.docker.compose.service, the service name in compose.yaml"
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="more labels every container must carry"
    )
    port: int | None = Field(None, ge=1, le=65535, description="the app's port in the containers")
    network: str | None = Field(
        None, description="network whose container IP to use; unset = the only (or first) one"
    )
    docker_host: str | None = Field(
        None, description="Docker Engine URL, e.g. unix:///run/docker.sock; unset = $DOCKER_HOST"
    )
    ready_path: str | None = Field(
        "/", description="GET this until 200-399 before a container gets traffic; '' = no probe"
    )
    ready_timeout: PositiveSeconds = Field(
        30.0, description="a container not ready by then is left out until its next start"
    )
    drain_timeout: NonNegSeconds = Field(
        30.0, description="a stopping container's in-flight requests get this long"
    )

    @field_validator("ready_path")
    @classmethod
    def _origin_form(cls, v: str | None) -> str | None:
        if not v:
            return None  # TOML has no null: an empty path is how a file turns the probe off
        if not v.startswith("/") or any(c in v for c in " \r\n"):
            raise ValueError("must be a path starting with '/' without spaces")
        return v

    @model_validator(mode="after")
    def _some_selector(self) -> Discover:
        if not (self.compose_project or self.compose_service or self.labels):
            raise ValueError("give compose_project, compose_service or labels to select by")
        return self

    def selector(self) -> dict[str, str]:
        """Every label a container must carry (the compose ones included)."""
        wanted = dict(self.labels)
        if self.compose_project:
            wanted["com.docker.compose.project"] = self.compose_project
        if self.compose_service:
            wanted["com.docker.compose.service"] = self.compose_service
        return wanted
