"""What a config needs of the machine, checked before anything starts (``portico check``,
and every command that serves): files it writes can be written, app instances can start
(``control.appcheck``), and with ``strict`` its listen addresses are free.

Problems are ``(key path, reason)`` like config problems, so they print the same way.
"""

from __future__ import annotations

import datetime as dt
import os

from portico.config.model import Config
from portico.control.appcheck import check_apps
from portico.control.wafcheck import check_waf
from portico.errors import StartupError
from portico.runtime.stageorder import stage_order


def check_environment(config: Config, *, strict: bool = False) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    access = config.access_log
    writes_log = access.format != "off" and access.path != "-"
    if writes_log and (why := unwritable(access.path)) is not None:
        problems.append(("access_log.path", why))
    if config.server.pid_file and (why := unwritable(config.server.pid_file)) is not None:
        problems.append(("server.pid_file", why))
    problems.extend(check_apps(config))
    problems.extend(check_waf(config))
    problems.extend(stage_order(config))  # nothing reaches an upstream past its auth
    if config.tls:
        from portico.control.tlscheck import check_tls

        problems.extend(check_tls(config, dt.datetime.now(dt.UTC))[0])
    if strict:
        # Imported here: `portico check` without --strict loads nothing of the data plane.
        from portico.dataplane.listener import bind_socket

        addresses = [(f"server.listen[{i}]", a) for i, a in enumerate(config.server.listen)]
        addresses += [
            (f"tls[{i}].listen[{j}]", a)
            for i, t in enumerate(config.tls)
            for j, a in enumerate(t.listen)
        ]
        for key, address in addresses:
            try:
                # As the server binds (no SO_REUSEPORT): a port someone holds is taken.
                bind_socket(address, reuse_port=False, backlog=1).close()
            except StartupError as exc:
                problems.append((key, str(exc)))
        if config.admin is not None and config.admin.listen:
            try:
                bind_socket(config.admin.listen, reuse_port=False, backlog=1).close()
            except StartupError as exc:
                problems.append(("admin.listen", str(exc)))
    return problems


def unwritable(path: str) -> str | None:
    """Why ``path`` cannot be created or appended to, or None when it can."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        return f"{full} is a directory"
    if os.path.exists(full):
        return None if os.access(full, os.W_OK) else f"{full} is not writable"
    directory = os.path.dirname(full)
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"directory {directory} is not writable"
    return None
