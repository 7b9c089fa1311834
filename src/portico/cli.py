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

from typing import TYPE_CHECKING, Any, get_args

import click
from pydantic import BaseModel

from portico import __version__
from portico.config.load import config_from_flags, load_file
from portico.config.model import AccessLog, Config, Server, Upstream
from portico.errors import ConfigError
from portico.policy.balancers import BALANCERS

if TYPE_CHECKING:
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
def main() -> None:
    """Portico: an HTTP reverse proxy and load balancer."""


@main.command()
@click.argument("file", type=click.Path(path_type=str))
@click.pass_context
def check(ctx: click.Context, file: str) -> None:
    """Validate the config FILE without starting anything.

    Prints every problem as "key.path: reason", one per line, and exits 1; or prints a short
    summary of what would run and exits 0.
    """
    # No click.Path(exists=True): a missing file is a config problem like any other (exit 1,
    # same format), not a usage error.
    try:
        config = load_file(file)
    except ConfigError as e:
        _echo_problems(e)
        ctx.exit(EXIT_CHECK_FAILED)
    for line in summarize(config, file):
        click.echo(line)


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
@click.pass_context
def proxy(
    ctx: click.Context,
    listen: tuple[str, ...],
    backends: tuple[str, ...],
    balancer: str | None,
    workers: int | None,
    access_log: str | None,
) -> None:
    """Proxy to a set of backends with no config file.

    \b
    Example:
      portico proxy --listen 127.0.0.1:8080 \\
        --backend http://127.0.0.1:5001 --backend http://127.0.0.1:5002
    """
    try:
        config = config_from_flags(
            listen=listen,
            backends=backends,
            balancer=balancer,
            workers=workers,
            access_log=access_log,
        )
    except ConfigError as e:
        _echo_problems(e, err=True)
        ctx.exit(EXIT_CONFIG_REFUSED)
    ctx.exit(_run(config))


def summarize(config: Config, source: str) -> list[str]:
    """The lines ``portico check`` prints for a valid config."""
    lines = [
        f"{source}: ok",
        f"listen: {', '.join(config.server.listen)}",
        f"workers: {config.server.workers}",
        "upstreams:",
    ]
    for name, upstream in config.upstreams.items():
        backends = ", ".join(
            b.url if b.weight == 1 else f"{b.url} (weight {b.weight})" for b in upstream.backends
        )
        lines.append(f"  {name} ({upstream.balancer}): {backends or 'no backends'}")
    lines.append("routes:")
    if config.routes:
        lines.extend(f"  {r.host or '*'}{r.path} -> {r.upstream}" for r in config.routes)
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
    import logging

    from portico.gateway import LOG_FORMAT, serve

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    code: int = serve(config, source)
    return code
