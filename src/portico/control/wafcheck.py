"""What the WAF needs of the machine, for ``portico check`` and every command that serves:
the binding, the rule set's files, and rules that compile. Problems are (key path, reason)
with the way to fix them, like every other config problem."""

from __future__ import annotations

import os

from portico.config.model import Config
from portico.config.waf import DEFAULT_CRS, Waf
from portico.policy.waf import crs_files, sources
from portico.runtime.waf import INSTALL_HINT, WafRulesError, load_rules

CRS_HINT = "apt install modsecurity-crs (Debian/Ubuntu), or set crs to a CRS rules directory"


def check_waf(config: Config) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for i, route in enumerate(config.effective_routes()):
        cfg = route.waf
        if cfg is None or not cfg.enabled:
            continue
        key = f"routes[{i}].waf"
        try:
            import libmodsecurity  # noqa: F401
        except ImportError:
            return [(key, f"libmodsecurity is not installed: {INSTALL_HINT}")]
        # Each route on its own (loading the CRS takes tens of milliseconds): the problem
        # is reported under the key of every route it affects.
        problems.extend(_files(cfg, key) or _compiles(cfg, key))
    return problems


def _files(cfg: Waf, key: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if cfg.crs is not None:
        if not os.path.isdir(cfg.crs):
            hint = CRS_HINT if cfg.crs == DEFAULT_CRS else "not a directory"
            out.append((f"{key}.crs", f"{cfg.crs}: no such directory ({hint})"))
        elif not crs_files(cfg.crs):
            out.append((f"{key}.crs", f"{cfg.crs}: no *.conf rule files ({CRS_HINT})"))
    setup = cfg.crs_setup if cfg.crs is not None else None
    if setup is not None and (why := _unreadable(setup)) is not None:
        out.append((f"{key}.crs_setup", why))
    for n, path in enumerate(cfg.rules):
        if (why := _unreadable(path)) is not None:
            out.append((f"{key}.rules[{n}]", why))
    return out


def _unreadable(path: str) -> str | None:
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"


def _compiles(cfg: Waf, key: str) -> list[tuple[str, str]]:
    try:
        load_rules(sources(cfg, key))
    except WafRulesError as exc:
        return [(exc.key, exc.reason)]
    return []
