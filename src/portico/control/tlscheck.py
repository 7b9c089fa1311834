"""``portico check`` (and every start) for TLS: each certificate file is read and judged by
``policy.certificates``; problems carry the key path of the file, warnings the date.

A route host that no certificate of any TLS listener covers is reported too: with
``https_redirect`` that name could never be served (an error), otherwise it is served over
plain HTTP only (a warning).
"""

from __future__ import annotations

import datetime as dt
import os

from portico.config.model import Config
from portico.config.tls import CertFile
from portico.policy.certificates import inspect
from portico.policy.certnames import NameTable

Problems = list[tuple[str, str]]


def _read(path: str) -> bytes | str:
    """The file's bytes, or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"


def _password(cf: CertFile) -> bytes | str | None:
    if cf.password_env:
        value = os.environ.get(cf.password_env)
        return value.encode() if value is not None else f"{cf.password_env} is not set"
    if cf.password_file:
        data = _read(cf.password_file)
        return data.rstrip(b"\r\n") if isinstance(data, bytes) else data
    return None


def check_cert(cf: CertFile, key: str, now: dt.datetime) -> tuple[list[str], Problems, Problems]:
    """The names of one certificate, its problems and its warnings."""
    cert = _read(cf.cert)
    if isinstance(cert, str):
        return [], [(f"{key}.cert", cert)], []
    keydata = _read(cf.key)
    if isinstance(keydata, str):
        return [], [(f"{key}.key", keydata)], []
    password = _password(cf)
    if isinstance(password, str):
        where = "password_env" if cf.password_env else "password_file"
        return [], [(f"{key}.{where}", password)], []
    try:
        facts = inspect(cert, keydata, password, now)
    except ValueError as exc:
        return [], [(f"{key}.cert", f"{cf.cert}: {exc}")], []
    problems = []
    for error in facts.errors:
        # Key-related reasons belong to the key's path.
        field = "key" if "key" in error or "password" in error else "cert"
        problems.append((f"{key}.{field}", error))
    warnings = [(f"{key}.cert", w) for w in facts.warnings]
    return facts.names, problems, warnings


def check_tls(config: Config, now: dt.datetime) -> tuple[Problems, Problems]:
    """(problems, warnings) of the TLS section."""
    problems: Problems = []
    warnings: Problems = []
    tables: list[NameTable[int]] = []
    for i, listener in enumerate(config.tls):
        entries = []
        for j, cf in enumerate(listener.certs):
            names, p, w = check_cert(cf, f"tls[{i}].certs[{j}]", now)
            problems += p
            warnings += w
            entries.append((names, j))
        if listener.auto is not None:
            entries.append((list(listener.auto.names), len(entries)))
        tables.append(NameTable(entries, -1))
        auto = listener.auto
        if auto is not None:
            state = os.path.abspath(auto.state_dir)
            existing = state
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
                problems.append((f"tls[{i}].auto.state_dir", f"{existing} is not writable"))
            if auto.challenge == "http-01" and not config.server.listen and auto.issuer == "acme":
                problems.append(
                    (f"tls[{i}].auto.challenge", "http-01 needs a plain listener (server.listen)")
                )
        auth = listener.client_auth
        if auth is not None and isinstance(why := _read(auth.ca), str):
            problems.append((f"tls[{i}].client_auth.ca", why))
    if tables:
        for r, route in enumerate(config.routes):
            hosts = [route.host] if isinstance(route.host, str) else list(route.host or ())
            for host in hosts:
                probe = "x" + host[1:] if host.startswith("*.") else host
                if not any(t.covers(probe) for t in tables):
                    msg = f"no certificate of any tls listener covers {host}"
                    if config.https_redirect:
                        problems.append((f"routes[{r}].host", msg + " (https_redirect is on)"))
                    else:
                        warnings.append((f"routes[{r}].host", msg + " (served over HTTP only)"))
    return problems, warnings
