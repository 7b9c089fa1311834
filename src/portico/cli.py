"""The ``portico`` command line: the only module that talks to the terminal and exits.

Every command turns its input into a ``Config`` through ``portico.config.load`` (a file, or
flags fed as data into the same schema; no option here restates a schema rule or default) and
hands it to ``portico.gateway.serve``. The gateway is imported only inside the commands that
run it, so ``check`` and ``--help`` never load the data plane.

Exit codes:

- 0: ``check`` found no problem, or the server stopped cleanly;
- 1: ``check`` found problems;
- 2: bad usage, or ``serve``/``proxy`` refused the configuration and started nothing (the
  code click already uses for usage errors, so scripts see one "did not start" code);
- otherwise whatever ``portico.gateway.serve`` returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, get_args

import click
from pydantic import BaseModel

from portico import __version__
from portico.config.load import config_for_app, config_from_flags, load_file
from portico.config.model import AccessLog, Config, Server, Upstream
from portico.config.routes import describe
from portico.errors import ConfigError, StartupError
from portico.policy.balancers import BALANCERS

if TYPE_CHECKING:
    from portico.control.pidfile import Master
    from portico.gateway import ConfigSource

EXIT_CHECK_FAILED = 1
EXIT_CONFIG_REFUSED = 2


def _default(model: type[BaseModel], field: str) -> Any:
    """A schema default, read from the schema so help text can never disagree with it."""
    return model.model_fields[field].get_default(call_default_factory=True)


_LISTEN_DEFAULT = ", ".join(_default(Server, "listen"))
_BALANCER_CHOICES = ", ".join(sorted(BALANCERS))
_ACCESS_LOG_CHOICES = ", ".join(get_args(AccessLog.model_fields["format"].annotation))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="portico")
@click.option("--debug", is_flag=True, help="Show Python tracebacks of failures.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Portico's own log lines: text, or one JSON object per line. [default: text]",
)
@click.pass_context
def main(ctx: click.Context, debug: bool, log_format: str | None) -> None:
    """Portico: an HTTP reverse proxy and load balancer."""
    ctx.obj = {"debug": debug, "log_format": log_format}


@main.command()
@click.argument("file", type=click.Path(path_type=str))
@click.option("--strict", is_flag=True, help="Also check that the listen addresses are free.")
@click.pass_context
def check(ctx: click.Context, file: str, strict: bool) -> None:
    """Validate the config FILE and what it needs of this machine, starting nothing.

    Prints every problem as "key.path: reason", one per line, and exits 1; or prints a short
    summary of what would run and exits 0. Besides the schema: files Portico writes can be
    written, app directories and commands exist, wsgi/asgi modules import, and with
    --strict, the listen addresses are free.
    """
    from portico.control.envcheck import check_environment

    # No click.Path(exists=True): a missing file is a config problem like any other (exit 1,
    # same format), not a usage error.
    try:
        config = load_file(file)
    except ConfigError as e:
        _echo_problems(e)
        ctx.exit(EXIT_CHECK_FAILED)
    if problems := check_environment(config, strict=strict):
        _echo_problems(ConfigError(problems))
        ctx.exit(EXIT_CHECK_FAILED)
    for line in summarize(config, file):
        click.echo(line)
    from portico.runtime.compile import shadowed

    for warning in shadowed(config):
        click.echo(f"warning: {warning}", err=True)
    if config.tls:
        import datetime as dt

        from portico.control.tlscheck import check_tls

        for key, reason in check_tls(config, dt.datetime.now(dt.UTC))[1]:
            click.echo(f"warning: {key}: {reason}", err=True)
    if config.redis is not None:
        from portico.dataplane.redislimit import unreachable

        why = unreachable(config.redis)
        # Fail-open runs without Redis (a warning); fail-closed would refuse every request.
        if why is not None and config.redis.on_error == "open":
            click.echo(f"warning: redis.url: {why} (on_error = open: admitted meanwhile)", err=True)
        elif why is not None:
            click.echo(f"redis.url: {why} (on_error = closed would refuse requests)", err=True)
            ctx.exit(EXIT_CHECK_FAILED)


@main.command()
@click.option(
    "-c",
    "--config",
    "config_file",
    required=True,
    type=click.Path(path_type=str),
    metavar="FILE",
    help="TOML config file to run.",
)
@click.option(
    "-w",
    "--workers",
    type=int,
    default=None,
    metavar="N",
    help="Worker processes; overrides server.workers from the file.",
)
@click.pass_context
def serve(ctx: click.Context, config_file: str, workers: int | None) -> None:
    """Run the proxy described by a config file."""
    overrides: dict[str, object] = {}
    if workers is not None:
        overrides["server.workers"] = workers
    try:
        config = load_file(config_file, overrides)
    except ConfigError as e:
        _echo_problems(e, err=True)
        ctx.exit(EXIT_CONFIG_REFUSED)
    from portico.gateway import ConfigSource

    ctx.exit(_run(config, ConfigSource(config_file, overrides)))


@main.command()
@click.option(
    "-l",
    "--listen",
    multiple=True,
    metavar="HOST:PORT",
    help=f"Address to listen on; repeatable. [default: {_LISTEN_DEFAULT}]",
)
@click.option(
    "-b",
    "--backend",
    "backends",
    multiple=True,
    required=True,
    metavar="URL",
    help="Backend server as http://host:port; repeatable, at least one.",
)
@click.option(
    "--balancer",
    default=None,
    metavar="NAME",
    help=f"One of: {_BALANCER_CHOICES}. [default: {_default(Upstream, 'balancer')}]",
)
@click.option(
    "-w",
    "--workers",
    type=int,
    default=None,
    metavar="N",
    help=f"Worker processes. [default: {_default(Server, 'workers')}]",
)
@click.option(
    "--access-log",
    default=None,
    metavar="FORMAT",
    help=(
        f"Access log to standard output, one of: {_ACCESS_LOG_CHOICES}. "
        f"[default: {_default(AccessLog, 'format')}]"
    ),
)
@click.option(
    "--tls-cert",
    "tls_certs",
    multiple=True,
    metavar="PEM",
    help="Serve HTTPS with this certificate chain; repeatable (one per name, SNI picks).",
)
@click.option(
    "--tls-key",
    "tls_keys",
    multiple=True,
    metavar="PEM",
    help="Private key of the --tls-cert in the same position.",
)
@click.pass_context
def proxy(
    ctx: click.Context,
    listen: tuple[str, ...],
    backends: tuple[str, ...],
    balancer: str | None,
    workers: int | None,
    access_log: str | None,
    tls_certs: tuple[str, ...],
    tls_keys: tuple[str, ...],
) -> None:
    """Proxy to a set of backends with no config file.

    \b
    Example:
      portico proxy --listen 127.0.0.1:8080 \\
        --backend http://127.0.0.1:5001 --backend http://127.0.0.1:5002
    """
    if len(tls_certs) != len(tls_keys):
        _echo_problems(ConfigError([("--tls-key", "give one --tls-key per --tls-cert")]), err=True)
        ctx.exit(EXIT_CONFIG_REFUSED)
    try:
        config = config_from_flags(
            listen=listen,
            backends=backends,
            balancer=balancer,
            workers=workers,
            access_log=access_log,
            tls_certs=list(zip(tls_certs, tls_keys, strict=True)),
        )
    except ConfigError as e:
        _echo_problems(e, err=True)
        ctx.exit(EXIT_CONFIG_REFUSED)
    ctx.exit(_run(config))


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("-l", "--listen", multiple=True, metavar="HOST:PORT", help="Address to listen on.")
@click.option("--wsgi", metavar="MODULE:APP", help="Run a WSGI app under gunicorn.")
@click.option("--asgi", metavar="MODULE:APP", help="Run an ASGI app under uvicorn.")
@click.option("--cwd", metavar="DIR", help="Working directory of the instances.")
@click.option("--min", "min_", type=int, default=None, help="Fewest instances (0: scale to zero).")
@click.option("--max", "max_", type=int, default=None, help="Most instances.")
@click.option(
    "--metric",
    default=None,
    metavar="NAME",
    help="Autoscaling signal: in_flight, rps, p95_latency or cpu. [default: in_flight]",
)
@click.option("--target", type=float, default=None, help="Target value of the metric per instance.")
@click.option("--ready-path", default=None, metavar="PATH", help="Readiness probe path.")
@click.option("--access-log", default=None, metavar="FORMAT", help="common, combined or json.")
@click.option("--pid-file", default=None, metavar="FILE", help="Write the process id here.")
@click.option("-w", "--workers", type=int, default=None, metavar="N", help="Data-plane processes.")
@click.option(
    "--shed",
    type=int,
    default=None,
    metavar="N",
    help="Shed load past N requests in flight per instance (503), holding them while "
    "instances start.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(
    ctx: click.Context,
    listen: tuple[str, ...],
    wsgi: str | None,
    asgi: str | None,
    cwd: str | None,
    min_: int | None,
    max_: int | None,
    metric: str | None,
    target: float | None,
    ready_path: str | None,
    access_log: str | None,
    pid_file: str | None,
    workers: int | None,
    shed: int | None,
    command: tuple[str, ...],
) -> None:
    """Run instances of an app and proxy to them; heal, roll and auto-scale them.

    The command gets a free loopback port as {port} in its arguments and as $PORT.
    Autoscaling is on when --max is above --min (or --target/--metric is given).

    \b
    Examples:
      portico run --listen 127.0.0.1:8080 --min 2 --max 8 -- gunicorn -b 127.0.0.1:{port} wsgi:app
      portico run --wsgi app:app --cwd examples/flask-app --min 1 --max 4
    """
    autoscale: dict[str, object] | None = None
    if metric is not None or target is not None or (max_ is not None and max_ > (min_ or 1)):
        autoscale = {"metric": metric, "target": target}
        autoscale = {k: v for k, v in autoscale.items() if v is not None}
    app = {
        "command": list(command) or None,
        "wsgi": wsgi,
        "asgi": asgi,
        "cwd": cwd,
        "min": min_,
        "max": max_ if max_ is not None else (min_ if min_ and min_ > 4 else None),
        "ready_path": ready_path,
        "autoscale": autoscale,
    }
    try:
        config = config_for_app(
            app,
            listen=listen,
            access_log=access_log,
            pid_file=pid_file,
            workers=workers,
            shed=shed,
        )
    except ConfigError as e:
        _echo_problems(e, err=True)
        ctx.exit(EXIT_CONFIG_REFUSED)
    ctx.exit(_run(config))


def _target_options(f: Callable[..., None]) -> Callable[..., None]:
    """--pid, --pid-file and -c: the three ways to name the running Portico."""
    f = click.option(
        "-c",
        "--config",
        "config_file",
        default=None,
        metavar="FILE",
        help="Config whose server.pid_file names the running Portico.",
    )(f)
    f = click.option(
        "--pid-file", default=None, metavar="FILE", help="Pid file of the running Portico."
    )(f)
    return click.option("--pid", type=int, default=None, help="Process id of the running Portico.")(
        f
    )


@main.command()
@_target_options
@click.pass_context
def restart(
    ctx: click.Context, pid: int | None, pid_file: str | None, config_file: str | None
) -> None:
    """Rolling restart of every app instance (the same as sending SIGUSR1).

    Instances are replaced one by one: a new one starts, becomes ready, then an old one
    drains and stops, so no request is lost.
    """
    import signal

    master = _find_master(ctx, pid, pid_file, config_file)
    if master.command == "proxy":
        _fail(ctx, f"process {master.pid} runs `portico proxy`: it has no app instances")
    _signal(ctx, master.pid, signal.SIGUSR1)
    click.echo(f"rolling restart requested from process {master.pid}")


@main.command()
@_target_options
@click.pass_context
def reload(
    ctx: click.Context, pid: int | None, pid_file: str | None, config_file: str | None
) -> None:
    """Reload the config file of a running `portico serve` (the same as sending SIGHUP).

    A file with problems is refused and the running config stays; the problems are in
    Portico's log.
    """
    import signal

    master = _find_master(ctx, pid, pid_file, config_file)
    if master.command != "serve":
        _fail(
            ctx,
            f"process {master.pid} runs `portico {master.command}`, which has no config file"
            " to reload",
        )
    _signal(ctx, master.pid, signal.SIGHUP)
    click.echo(f"reload requested from process {master.pid}")


@main.command()
@_target_options
@click.option("--wait/--no-wait", default=True, help="Wait until it has stopped. [default: wait]")
@click.option(
    "--timeout", type=float, default=60.0, metavar="S", help="Longest wait. [default: 60]"
)
@click.pass_context
def stop(
    ctx: click.Context,
    pid: int | None,
    pid_file: str | None,
    config_file: str | None,
    wait: bool,
    timeout: float,
) -> None:
    """Stop a running Portico gracefully (the same as sending SIGTERM)."""
    import signal
    import time

    import psutil

    master = _find_master(ctx, pid, pid_file, config_file)
    _signal(ctx, master.pid, signal.SIGTERM)
    click.echo(f"stop requested from process {master.pid}")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(master.pid) and time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(master.pid).status() == psutil.STATUS_ZOMBIE:
                break  # stopped; its parent has yet to collect it
        time.sleep(0.05)
    if psutil.pid_exists(master.pid) and time.monotonic() >= deadline:
        _fail(ctx, f"process {master.pid} is still stopping after {timeout:g}s")
    click.echo(f"process {master.pid} stopped")


def _admin_options(f: Callable[..., None]) -> Callable[..., None]:
    """Where the admin API is: -c FILE (its [admin] table), or --admin/--unix-socket."""
    f = click.option(
        "--token",
        envvar="PORTICO_ADMIN_TOKEN",
        default=None,
        help="Bearer token, needed when admin.read = token. [env: PORTICO_ADMIN_TOKEN]",
    )(f)
    f = click.option("--unix-socket", default=None, metavar="PATH", help="Admin Unix socket.")(f)
    f = click.option(
        "--admin",
        "admin_url",
        envvar="PORTICO_ADMIN",
        default=None,
        metavar="URL",
        help="Admin listener. [default: http://127.0.0.1:9901; env: PORTICO_ADMIN]",
    )(f)
    return click.option(
        "-c", "--config", "config_file", default=None, metavar="FILE",
        help="Config whose [admin] table says where the admin API is.",
    )(f)  # fmt: skip


def _admin_target(
    ctx: click.Context,
    config_file: str | None,
    admin_url: str | None,
    unix_socket: str | None,
    token: str | None,
) -> Any:
    from portico.admin.console import Target

    target = Target()
    if config_file is not None:
        try:
            config = load_file(config_file)
        except ConfigError as e:
            _echo_problems(e, err=True)
            ctx.exit(EXIT_CONFIG_REFUSED)
        if config.admin is None:
            _fail(ctx, f"{config_file} has no [admin] table")
        if config.admin.listen:
            target.url = f"http://{config.admin.listen}"
        target.unix_socket = config.admin.unix_socket
        target.token = config.admin.token
    if admin_url is not None:
        target.url, target.unix_socket = admin_url, None
    if unix_socket is not None:
        target.unix_socket = unix_socket
    if token is not None:
        target.token = token
    return target


@main.command()
@_admin_options
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of tables.")
@click.pass_context
def status(
    ctx: click.Context,
    config_file: str | None,
    admin_url: str | None,
    unix_socket: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Print the fleet (endpoints, apps, instances, recent events) from the admin API."""
    import json

    from portico.admin.console import AdminUnreachable, poll, render

    target = _admin_target(ctx, config_file, admin_url, unix_socket, token)
    try:
        now = poll(target)
    except AdminUnreachable as exc:
        _fail(ctx, f"cannot read the admin API at {exc}")
    if as_json:
        data = {"status": now.status, "upstreams": now.upstreams, "apps": now.apps,
                "events": now.events}  # fmt: skip
        click.echo(json.dumps(data, indent=2))
        return
    for line in render(now):
        click.echo(line)


@main.command()
@_admin_options
@click.option("--interval", type=float, default=1.0, metavar="S", help="Seconds between updates.")
@click.option("--count", type=int, default=None, metavar="N", help="Stop after N updates.")
@click.pass_context
def top(
    ctx: click.Context,
    config_file: str | None,
    admin_url: str | None,
    unix_socket: str | None,
    token: str | None,
    interval: float,
    count: int | None,
) -> None:
    """Show the fleet live, with req/s per endpoint, until Ctrl-C (or --count updates)."""
    import sys
    import time

    from portico.admin.console import AdminUnreachable, poll, render

    target = _admin_target(ctx, config_file, admin_url, unix_socket, token)
    before = None
    shown = 0
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
    try:
        while count is None or shown < count:
            try:
                now = poll(target, events=8)
            except AdminUnreachable as exc:
                _fail(ctx, f"cannot read the admin API at {exc}")
            click.echo(clear + "\n".join(render(now, before, rates=True)) + ("" if clear else "\n"))
            before = now
            shown += 1
            if count is None or shown < count:
                time.sleep(max(0.1, interval))
    except KeyboardInterrupt:
        pass


def _find_master(
    ctx: click.Context, pid: int | None, pid_file: str | None, config_file: str | None
) -> Master:
    """The running Portico master the options name, verified; exits 1 with the reason when
    it is not one (a stale pid file, a pid now used by another program)."""
    from portico.control import pidfile

    if sum(x is not None for x in (pid, pid_file, config_file)) != 1:
        raise click.UsageError("give exactly one of --pid, --pid-file or -c FILE")
    try:
        if pid is not None:
            return pidfile.verify(pid)
        if config_file is not None:
            try:
                config = load_file(config_file)
            except ConfigError as e:
                _echo_problems(e, err=True)
                ctx.exit(EXIT_CONFIG_REFUSED)
            if not config.server.pid_file:
                raise click.UsageError(f"{config_file} sets no server.pid_file")
            pid_file = config.server.pid_file
        assert pid_file is not None
        return pidfile.read(pid_file)
    except pidfile.NotPortico as exc:
        _fail(ctx, str(exc))


def _signal(ctx: click.Context, pid: int, sig: int) -> None:
    import os

    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        _fail(ctx, f"process {pid} is gone")
    except PermissionError:
        _fail(ctx, f"not allowed to signal process {pid} (another user's)")


def _fail(ctx: click.Context, message: str) -> NoReturn:
    click.echo(f"portico: {message}", err=True)
    ctx.exit(EXIT_CHECK_FAILED)
    raise AssertionError("unreachable")


def summarize(config: Config, source: str) -> list[str]:
    """The lines ``portico check`` prints for a valid config."""
    lines = [
        f"{source}: ok",
        f"listen: {', '.join(config.server.listen)}",
        f"workers: {config.server.workers}",
        "upstreams:",
    ]
    for i, t in enumerate(config.tls):  # after "listen:", before the upstreams
        auto = f", auto {t.auto.issuer} for {', '.join(t.auto.names)}" if t.auto else ""
        lines.insert(
            2 + i, f"tls[{i}]: {', '.join(t.listen)} ({len(t.certs)} certificate(s){auto})"
        )
    for name, upstream in config.upstreams.items():
        backends = ", ".join(
            b.url if b.weight == 1 else f"{b.url} (weight {b.weight})" for b in upstream.backends
        )
        if upstream.app is not None:
            app = upstream.app
            what = app.wsgi or app.asgi or " ".join(app.command or [])
            if app.docker is not None:
                what = f"docker {app.docker.image}"
            if app.kubernetes is not None:
                what = f"deployment {app.kubernetes.deployment}"
            backends = f"app {what!r}, {app.min}..{app.max} instances"
        if upstream.kubernetes is not None:
            backends = f"pods of service {upstream.kubernetes.service} (EndpointSlices)"
        if upstream.discover is not None:
            selector = ", ".join(f"{k}={v}" for k, v in upstream.discover.selector().items())
            backends = f"containers with {selector}"
        lines.append(f"  {name} ({upstream.balancer}): {backends or 'no backends'}")
    if config.admin is not None:
        where = [f"http://{config.admin.listen}"] if config.admin.listen else []
        where += [f"unix:{config.admin.unix_socket}"] if config.admin.unix_socket else []
        guard = "actions need a token" if config.admin.all_tokens() else "actions: socket only"
        lines.append(f"admin: {', '.join(where)} ({guard})")
    lines.append("routes:")
    if config.routes:
        lines.extend(f"  {describe(r)}" for r in config.routes)
    else:
        (only,) = config.upstreams
        lines.append(f"  (none: every request goes to {only})")
    return lines


def _echo_problems(error: ConfigError, *, err: bool = False) -> None:
    for path, reason in error.problems:
        click.echo(f"{path}: {reason}", err=err)


def _run(config: Config, source: ConfigSource | None = None) -> int:
    # Imported here, not at the top: loading the data plane (uvloop, httptools, sockets) is
    # only needed by the commands that serve, and `check` must work without it.
    from portico.control import logformat
    from portico.control.envcheck import check_environment
    from portico.gateway import serve

    options = click.get_current_context().obj or {}
    logformat.configure(options.get("log_format"))
    debug = bool(options.get("debug"))
    if problems := check_environment(config):
        for path, reason in problems:
            click.echo(f"portico: cannot start: {path}: {reason}", err=True)
        return EXIT_CONFIG_REFUSED
    try:
        code: int = serve(config, source)
    except Exception as exc:
        message = user_facing(exc)
        if message is None or debug:
            raise
        click.echo(f"portico: {message}", err=True)
        return EXIT_CONFIG_REFUSED
    return code


def user_facing(exc: BaseException) -> str | None:
    """One line for a failure the user can fix (a busy port, a missing file, a missing
    optional dependency), or None for a bug, whose traceback is worth showing."""
    if isinstance(exc, StartupError):
        return f"cannot start: {exc}"
    if isinstance(exc, ConfigError):
        return f"cannot start: {exc}"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        extra = OPTIONAL_DEPENDENCIES.get(exc.name.partition(".")[0])
        if extra is not None:
            return f"cannot start: {exc.name} is not installed: pip install -e '.[{extra}]'"
        return None
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot start:{where}: {exc.strerror or exc}"
    return None


# Optional imports and the extra that installs each (pyproject.toml's optional-dependencies).
OPTIONAL_DEPENDENCIES = {"docker": "docker", "uvicorn": "asgi", "gunicorn": "demo"}
