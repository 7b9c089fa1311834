"""App mistakes caught before the first start, and named when an instance fails anyway.

Before any instance starts, each local app is checked the way it will run: its working
directory exists, its command resolves to an executable, and for ``wsgi``/``asgi`` the server
(gunicorn, uvicorn) is installed and the app module imports, in a child Python with the
instance's directory and environment (the child's last line of error is the cause). Each
problem is ``(key path, reason)`` like a config problem, so the CLI prints it the same way.

Once running, an instance that never passes its readiness probe because nothing listens on
its port is told apart from a slow one: its process tree is asked which ports it does listen
on, which names the usual cause (a command that ignores ``{port}`` and ``$PORT``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable

import psutil

from portico.config.model import App, Config

# Seconds the import check may take (an app that does heavy work at import time).
IMPORT_CHECK_TIMEOUT = 20.0
# Lines of an instance's output kept for the crash report.
TAIL_LINES = 8

_SERVERS = {"wsgi": ("gunicorn", "demo"), "asgi": ("uvicorn", "asgi")}

_IMPORT = """
import importlib, sys
sys.path.insert(0, '')
module, _, attr = sys.argv[1].partition(':')
m = importlib.import_module(module)
if attr and not hasattr(m, attr.split('(')[0]):
    sys.exit(f"module {module!r} has no attribute {attr!r}")
"""


def check_apps(config: Config) -> list[tuple[str, str]]:
    """Every problem found with the config's local apps, as ``(key path, reason)``."""
    problems: list[tuple[str, str]] = []
    no_sdk = importlib.util.find_spec("docker") is None
    no_kube = importlib.util.find_spec("lightkube") is None
    for name, upstream in config.upstreams.items():
        app = upstream.app
        kube = upstream.kubernetes is not None or (app is not None and app.kubernetes is not None)
        if kube:
            if no_kube:
                path = f"upstreams.{name}.{'app.kubernetes' if app is not None else 'kubernetes'}"
                why = "the kubernetes client is not installed: pip install -e '.[kubernetes]'"
                problems.append((path, why))
        elif app is not None and app.docker is None:
            path = f"upstreams.{name}.app"
            problems.extend((f"{path}.{key}", why) for key, why in check_app(app))
        elif no_sdk and (app is not None or upstream.discover is not None):
            path = f"upstreams.{name}.{'app.docker' if app is not None else 'discover'}"
            problems.append((path, "the docker SDK is not installed: pip install -e '.[docker]'"))
    return problems


def check_app(spec: App) -> list[tuple[str, str]]:
    """Problems with one local app, as ``(key, reason)``; empty when it looks runnable."""
    cwd = spec.cwd
    if cwd is not None and not os.path.isdir(cwd):
        what = "not a directory" if os.path.exists(cwd) else "no such directory"
        return [("cwd", f"{what}: {os.path.abspath(cwd)}")]
    for kind in ("wsgi", "asgi"):
        target = getattr(spec, kind)
        if target is None:
            continue
        server, extra = _SERVERS[kind]
        if importlib.util.find_spec(server) is None:
            return [(kind, f"{server} is not installed: pip install -e '.[{extra}]'")]
        failure = import_failure(target, cwd, spec.env)
        return [(kind, failure)] if failure else []
    assert spec.command is not None
    program = spec.command[0]
    if os.sep in program:
        full = os.path.join(cwd or ".", program)
        if not os.path.isfile(full):
            return [("command", f"no such file: {os.path.abspath(full)}")]
        if not os.access(full, os.X_OK):
            return [("command", f"not executable: {os.path.abspath(full)}")]
    elif shutil.which(program, path={**os.environ, **spec.env}.get("PATH")) is None:
        return [("command", f"{program!r} not found on PATH")]
    return []


def import_failure(target: str, cwd: str | None, env: dict[str, str]) -> str | None:
    """Why ``module:attr`` does not import in the instance's directory and environment (the
    last line of the child's error), or None when it does."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT, target],
            cwd=cwd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=IMPORT_CHECK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None  # slow, not broken: the readiness probe will tell
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    cause = lines[-1] if lines else f"exit status {done.returncode}"
    where = os.path.abspath(cwd or ".")
    return f"{target} does not import in {where}: {cause}"


def listening_ports(pid: int) -> list[int]:
    """TCP ports the process ``pid`` and its descendants listen on."""
    ports: set[int] = set()
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr:
                        ports.add(conn.laddr.port)
    return sorted(ports)


def not_listening(pid: int, port: int) -> str | None:
    """A diagnosis when the instance ``pid`` listens elsewhere or nowhere, or None when it
    listens on ``port`` (then it is just not ready yet)."""
    ports = listening_ports(pid)
    if port in ports:
        return None
    if ports:
        shown = ", ".join(map(str, ports))
        return (
            f"not listening on its port {port} but on {shown}:"
            " the command must use {port} or $PORT"
        )
    return f"not listening on any port (it was given {port} as {{port}} and $PORT)"


_CAUSE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Exit|Interrupt)\b.*|^(error|fatal)\b.*", re.I)


def cause(tail: Iterable[str]) -> str | None:
    """The line of an instance's last output that names why it died: the last exception
    (or ``Error:``) line (gunicorn prints its own lines after a traceback), or None when
    there is none (killed by a signal, or the output says nothing)."""
    for line in reversed([line.strip() for line in tail]):
        # gunicorn's own log lines are "[date] [pid] [LEVEL] ..."; the cause is not one.
        if _CAUSE.match(line):
            return line
    return None
