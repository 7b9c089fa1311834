"""The one configuration schema. Files, CLI flags and tests all validate through ``Config``.

Every model forbids unknown keys so a typo is an error with its key path, never a silent
default. Durations are seconds (float); sizes accept integers or strings such as ``"10MiB"``.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from decimal import Decimal
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

PositiveSeconds = Annotated[float, Field(gt=0)]


def _split_argv(value: object) -> object:
    """A command may be written as one string; split it as a shell would (no expansion)."""
    return shlex.split(value) if isinstance(value, str) else value


Argv = Annotated[list[str], BeforeValidator(_split_argv)]
NonNegSeconds = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too). Raises ValueError with a readable reason."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r} is not host:port")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r} has no port (expected host:port)")
        return host or "127.0.0.1", default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    return host or "0.0.0.0", int(port_text)


# Byte units a size string may use, matched case-insensitively. Deliberately narrower than
# pydantic's ByteSize, which also takes bit units ("8kbit" is 1000 bytes) and one-letter units,
# and ignores trailing text ("10MiB oops" parses as 10MiB): for a limit, a misread unit is a
# silent misconfiguration, so anything else is refused with a reason.
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def _parse_size(value: object) -> object:
    """Bytes from an integer or a string such as ``"10MiB"`` / ``"1.5 GB"`` (rounded down)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must be at least 0, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError('expected a whole number of bytes or a string such as "10MiB"')
    m = _SIZE.match(value)
    if m is None:
        raise ValueError(f'{value!r} is not a size (expected a string such as "10MiB")')
    number, unit = m.groups()
    factor = _SIZE_UNITS.get(unit.lower() or "b")
    if factor is None:
        raise ValueError(
            f"{value!r}: unknown unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(Decimal(number) * factor)


def _check_listen_address(value: str) -> str:
    parse_hostport(value)
    return value


def _check_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network") from None
    return value


# Items are checked one by one (not in a list validator) so an error names its index:
# ``server.listen[1]: ...`` rather than the whole list.
ListenAddress = Annotated[str, AfterValidator(_check_listen_address)]
Network = Annotated[str, AfterValidator(_check_network)]
Size = Annotated[ByteSize, BeforeValidator(_parse_size)]


class Limits(Strict):
    """Request size limits. Each one answers with its own status code."""

    max_request_line: int = Field(8192, gt=0, description="longest request target in bytes (414)")
    max_header_bytes: int = Field(
        32768, gt=0, description="largest request head, request line included (431)"
    )
    max_headers: int = Field(100, gt=0, description="most header fields in one request (431)")
    max_body_bytes: Size | None = Field(
        None, description="largest request body (413); unset means unlimited"
    )


class ClientTimeouts(Strict):
    header: PositiveSeconds = Field(10.0, description="time to receive a whole request head (408)")
    body_idle: PositiveSeconds = Field(
        30.0, description="longest pause inside a request body (408)"
    )
    body_min_rate: NonNegSeconds = Field(
        256.0, description="minimum request-body bytes/s once body_grace has passed; 0 disables"
    )
    body_grace: NonNegSeconds = Field(5.0, description="seconds before body_min_rate applies")
    keepalive: PositiveSeconds = Field(75.0, description="idle time allowed between requests")
    send: PositiveSeconds = Field(60.0, description="longest time a client may stall our writes")


class Server(Strict):
    listen: list[ListenAddress] = Field(default_factory=lambda: ["127.0.0.1:8080"])
    workers: int = Field(1, ge=1, le=256)
    backlog: int = Field(2048, gt=0)
    pid_file: str | None = Field(
        None, description="file to write the main process id to (for `portico restart`)"
    )
    shutdown_grace: NonNegSeconds = Field(
        30.0, description="time in-flight requests get to finish on SIGTERM/Ctrl-C"
    )
    limits: Limits = Field(default_factory=Limits)
    timeouts: ClientTimeouts = Field(default_factory=ClientTimeouts)

    @field_validator("listen", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("listen")
    @classmethod
    def _not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one listen address is needed")
        return v


class Forwarding(Strict):
    """How the proxy tells the backend who the client is."""

    x_forwarded: bool = Field(True, description="set X-Forwarded-For/-Proto/-Host and X-Real-IP")
    forwarded: bool = Field(False, description="set the RFC 7239 Forwarded header")
    via: bool = Field(False, description="add a Via header on requests and responses")
    via_name: str = Field("portico", description="name this proxy gives itself in Via headers")
    trusted_proxies: list[Network] = Field(
        default_factory=list,
        description="networks whose forwarding headers are kept and appended to",
    )

    @field_validator("via_name")
    @classmethod
    def _http_token(cls, v: str) -> str:
        # It is written into a header as-is, so it must be an RFC 9110 token.
        if not _TOKEN.match(v):
            raise ValueError(f"{v!r} is not an HTTP token (letters, digits and !#$%&'*+-.^_`|~)")
        return v


class AccessLog(Strict):
    format: Literal["off", "common", "combined", "json"] = "off"
    path: str = Field("-", description="file to append to; '-' is standard output")


class Backend(Strict):
    url: str
    weight: int = Field(1, ge=1, le=1000)
    backup: bool = Field(False, description="takes traffic only when no primary is available")

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("not a URL (expected http://host:port)")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("not a URL: bad port") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a backend URL names a server only (no path, query or fragment)")
        return v

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or 80


class UpstreamTimeouts(Strict):
    connect: PositiveSeconds = Field(5.0, description="TCP connect to a backend (504)")
    response_header: PositiveSeconds = Field(
        60.0, description="from request sent to complete response head (504)"
    )
    body_idle: PositiveSeconds = Field(
        60.0, description="longest pause inside a response body before the transfer is aborted"
    )


class Pool(Strict):
    max_idle: int = Field(64, ge=0, description="idle keep-alive connections kept per endpoint")
    idle_timeout: PositiveSeconds = Field(
        10.0, description="close an idle upstream connection after this long"
    )


class HealthCheck(Strict):
    """Active health checks: Portico asks each endpoint itself, on a timer."""

    path: str = Field("/health", description="request target of the check")
    method: Literal["GET", "HEAD", "OPTIONS"] = "GET"
    expect_status: str = Field("200-399", description="passing statuses, e.g. '200,204,300-399'")
    expect_body: str | None = Field(None, description="substring the body must contain")
    interval: PositiveSeconds = Field(5.0, description="time between checks of a healthy endpoint")
    unhealthy_interval: PositiveSeconds | None = Field(
        None, description="time between checks of an unhealthy endpoint; unset = interval"
    )
    jitter: float = Field(0.1, ge=0, le=1, description="random share added to each interval")
    timeout: PositiveSeconds = Field(2.0, description="a check slower than this fails")
    rise: int = Field(2, ge=1, description="consecutive passes that bring an endpoint UP")
    fall: int = Field(3, ge=1, description="consecutive failures that take an endpoint DOWN")
    host: str | None = Field(None, description="Host header of the check; unset = host:port")

    @field_validator("path")
    @classmethod
    def _origin_form(cls, v: str) -> str:
        if not v.startswith("/") or any(c in v for c in " \r\n"):
            raise ValueError("must be a path starting with '/' without spaces")
        return v

    @field_validator("expect_status")
    @classmethod
    def _statuses(cls, v: str) -> str:
        from portico.policy.health import parse_statuses

        parse_statuses(v)
        return v


class Outlier(Strict):
    """Passive health: eject endpoints that keep failing real requests."""

    consecutive_failures: int = Field(
        5, ge=0, description="failures in a row (connect error or 5xx) that eject; 0 = off"
    )
    base_ejection: PositiveSeconds = Field(
        30.0, description="first ejection time; the n-th ejection lasts n times as long"
    )
    max_ejection: PositiveSeconds = Field(300.0, description="cap on one ejection")
    max_ejection_percent: float = Field(
        50.0, ge=0, le=100, description="never eject more than this share of the upstream"
    )


class Retry(Strict):
    attempts: int = Field(3, ge=1, le=10, description="tries in all, the first included")
    on_status: list[int] = Field(
        default_factory=lambda: [502, 503, 504], description="statuses that are retried"
    )
    per_try_timeout: PositiveSeconds | None = Field(
        None, description="time to a response head per try; unset = timeouts.response_header"
    )
    budget_percent: float = Field(
        20.0, ge=0, le=100, description="retries may be at most this share of active requests"
    )
    budget_min: int = Field(
        3, ge=0, description="retries always allowed at once, whatever the share"
    )

    @field_validator("on_status")
    @classmethod
    def _statuses(cls, v: list[int]) -> list[int]:
        for status in v:
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return v


class Sticky(Strict):
    cookie: str = Field("portico_backend", pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    max_age: PositiveSeconds | None = Field(None, description="cookie lifetime; unset = session")
    secret: str | None = Field(
        None,
        description="signing key; unset = random per start (cookies then do not survive restarts)",
    )


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
        given = [k for k in ("command", "wsgi", "asgi", "docker") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of command, wsgi, asgi or docker")
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
        import sys

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


class Upstream(Strict):
    backends: list[Backend] = Field(default_factory=list)
    app: App | None = Field(None, description="instances Portico runs, instead of backends")
    discover: Discover | None = Field(
        None, description="endpoints found in Docker by labels, instead of backends"
    )
    balancer: str = "round_robin"
    hash_key: str = Field(
        "client_ip",
        description="consistent_hash key: client_ip, path, uri, header:NAME or cookie:NAME",
    )
    host: str | None = Field(
        None, description="Host header sent upstream; unset passes the client's through"
    )
    timeouts: UpstreamTimeouts = Field(default_factory=UpstreamTimeouts)
    pool: Pool = Field(default_factory=Pool)
    health: HealthCheck | None = Field(None, description="active checks; unset = none")
    outlier: Outlier = Field(default_factory=Outlier)
    retry: Retry = Field(default_factory=Retry)
    sticky: Sticky | None = Field(None, description="sticky sessions by signed cookie")
    slow_start: NonNegSeconds = Field(
        0.0, description="seconds over which a newly healthy endpoint ramps to its full share"
    )
    max_requests: int | None = Field(
        None, ge=1, description="circuit breaker: concurrent requests per endpoint (per worker)"
    )

    @model_validator(mode="after")
    def _backends_or_app(self) -> Upstream:
        given = [k for k in ("backends", "app", "discover") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one of backends, app or discover, not {' and '.join(given)}")
        return self

    @field_validator("hash_key")
    @classmethod
    def _hash_key(cls, v: str) -> str:
        kind, _, name = v.partition(":")
        if v in ("client_ip", "path", "uri") or (kind in ("header", "cookie") and name):
            return v
        raise ValueError("must be client_ip, path, uri, header:NAME or cookie:NAME")

    @field_validator("backends", mode="before")
    @classmethod
    def _strings_are_urls(cls, v: object) -> object:
        if isinstance(v, list):
            return [{"url": item} if isinstance(item, str) else item for item in v]
        return v

    @field_validator("balancer")
    @classmethod
    def _known_balancer(cls, v: str) -> str:
        from portico.policy.balancers import BALANCERS

        if v not in BALANCERS:
            raise ValueError(f"unknown balancer {v!r} (one of: {', '.join(sorted(BALANCERS))})")
        return v


class Route(Strict):
    upstream: str
    path: str = Field("/", description="path prefix to match")
    host: str | None = Field(None, description="Host to match (port ignored); unset matches all")

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v


class Config(Strict):
    server: Server = Field(default_factory=Server)
    forwarding: Forwarding = Field(default_factory=Forwarding)
    access_log: AccessLog = Field(default_factory=AccessLog)
    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)

    @model_validator(mode="after")
    def _routes_name_upstreams(self) -> Config:
        # Cross-key checks name their own key paths, one "path: reason" per line, so that
        # portico.config.load can report each where it belongs. All of them are collected
        # rather than stopping at the first, so one `portico check` run shows every one.
        problems: list[str] = []
        if not self.upstreams:
            problems.append("upstreams: at least one upstream is needed")
        for i, route in enumerate(self.routes):
            if self.upstreams and route.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams))
                problems.append(
                    f"routes[{i}].upstream: no upstream named {route.upstream!r} (have: {known})"
                )
        if not self.routes and len(self.upstreams) > 1:
            problems.append("routes: several upstreams need routes saying which gets what")
        if self.server.workers > 1:
            for name, up in self.upstreams.items():
                if up.app is not None:
                    problems.append(
                        f"upstreams.{name}.app: apps run with server.workers = 1 for now"
                    )
                if up.discover is not None:
                    problems.append(
                        f"upstreams.{name}.discover: discovery runs with server.workers = 1 for now"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def effective_routes(self) -> list[Route]:
        """The configured routes, or a catch-all to the only upstream."""
        if self.routes:
            return list(self.routes)
        (name,) = self.upstreams
        return [Route(upstream=name)]
