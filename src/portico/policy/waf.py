"""What the WAF loads, in which order, and what a transaction's rule matches mean.

Pure: turns a route's ``waf`` config into the list of rule sources ModSecurity loads (our
engine settings, the CRS setup, the per-path exclusions, the CRS rules, the per-route
removals, the user's rules), and turns the rule ids a transaction matched into a verdict.
runtime/waf.py feeds these to libmodsecurity; nothing here imports it.

Why the engine always runs ``SecRuleEngine On``: in detection-only mode ModSecurity makes no
intervention, so we could not tell which requests *would* have been blocked. Running the
engine on and ignoring its intervention in ``detect`` mode logs exactly what ``block`` would
do.
"""

from __future__ import annotations

import glob
import os
from typing import NamedTuple

from portico.config.waf import Waf

# CRS files this build of libmodsecurity cannot load: IP reputation needs GeoIP/MaxMind,
# which the PyPI wheel's libmodsecurity is built without (and client IP rules are
# Portico's ip_allow/ip_deny job anyway).
SKIPPED_CRS_FILES = ("REQUEST-910-IP-REPUTATION.conf",)

# Ids of the rules Portico writes for per-path exclusions. ModSecurity's id ranges reserve
# 1-99999 for local rules and 900000-999999 for the CRS; this block is neither, so a user's
# own rules and the CRS never collide with ours.
EXCLUSION_ID_BASE = 9_410_000

# The CRS's blocking-evaluation rules: the ones whose match means "the score crossed the
# threshold" (949110 inbound, 959100 outbound). They are reported apart from the rules
# that added to the score.
EVALUATION_RULES = frozenset({949110, 959100, 980130, 980140})


class Source(NamedTuple):
    """One thing to load: a file path, or SecLang text; ``key`` is the config key it came
    from (for error messages)."""

    kind: str  # "file" or "text"
    value: str
    key: str


def engine_directives(cfg: Waf) -> str:
    limit = int(cfg.body_limit)
    return "\n".join(
        [
            "SecRuleEngine On",
            "SecRequestBodyAccess On",
            # Bodies beyond the limit are inspected up to it and passed on (documented):
            # Portico reads at most body_limit bytes before deciding.
            f"SecRequestBodyLimit {limit}",
            f"SecRequestBodyNoFilesLimit {limit}",
            "SecRequestBodyLimitAction ProcessPartial",
            f"SecResponseBodyAccess {'On' if cfg.inspect_response else 'Off'}",
            "SecResponseBodyLimit 524288",
            "SecResponseBodyMimeType text/plain text/html text/xml application/json",
            "SecResponseBodyLimitAction ProcessPartial",
            "SecAuditEngine Off",
            "SecArgumentSeparator &",
            "SecCookieFormat 0",
            "SecPcreMatchLimit 100000",
            "SecPcreMatchLimitRecursion 100000",
            # As ModSecurity's recommended config: JSON and XML bodies get their parsers.
            'SecRule REQUEST_HEADERS:Content-Type "@rx (?:application(?:/soap\\+|/)|text/)xml"'
            ' "id:9400001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"',
            'SecRule REQUEST_HEADERS:Content-Type "@rx application/(?:.+\\+)?json"'
            ' "id:9400002,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"',
        ]
    )


def crs_settings(cfg: Waf) -> str:
    """The CRS's tunables (its crs-setup.conf leaves these commented out: 901 fills in the
    defaults for what is not set)."""
    pl = cfg.paranoia_level
    return "\n".join(
        [
            f'SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level={pl}"',
            'SecAction "id:900110,phase:1,nolog,pass,t:none,'
            f"setvar:tx.inbound_anomaly_score_threshold={cfg.inbound_threshold},"
            f'setvar:tx.outbound_anomaly_score_threshold={cfg.outbound_threshold}"',
        ]
    )


def exclusion_directives(cfg: Waf) -> str:
    """Per-path exclusions as runtime rules that run before the CRS (phase 1): a ``ctl``
    removes the rule (or its look at some arguments) for this transaction only."""
    lines = []
    for i, ex in enumerate(cfg.exclusions):
        if ex.args:
            ctls = [f"ctl:ruleRemoveTargetById={r};ARGS:{a}" for r in ex.rules for a in ex.args]
        else:
            ctls = [f"ctl:ruleRemoveById={r}" for r in ex.rules]
        rid = EXCLUSION_ID_BASE + i
        lines.append(
            f'SecRule REQUEST_FILENAME "@beginsWith {ex.path}" '
            f'"id:{rid},phase:1,pass,nolog,t:none,{",".join(ctls)}"'
        )
    return "\n".join(lines)


def crs_files(directory: str) -> list[str]:
    """The CRS rule files in load order (their names sort into it), less the skipped ones."""
    names = sorted(glob.glob(os.path.join(directory, "*.conf")))
    return [n for n in names if os.path.basename(n) not in SKIPPED_CRS_FILES]


def sources(cfg: Waf, key: str) -> list[Source]:
    """Everything a route's WAF loads, in order. ``key``: the route's ``waf`` key path."""
    out = [Source("text", engine_directives(cfg), key)]
    if cfg.crs is not None:
        out.append(Source("text", crs_settings(cfg), f"{key}.paranoia_level"))
        if cfg.crs_setup is not None:
            out.append(Source("file", cfg.crs_setup, f"{key}.crs_setup"))
    if cfg.exclusions:
        out.append(Source("text", exclusion_directives(cfg), f"{key}.exclusions"))
    if cfg.crs is not None:
        out += [Source("file", f, f"{key}.crs") for f in crs_files(cfg.crs)]
    if cfg.exclude_rules:
        removal = "SecRuleRemoveById " + " ".join(str(r) for r in cfg.exclude_rules)
        out.append(Source("text", removal, f"{key}.exclude_rules"))
    out += [Source("file", path, f"{key}.rules[{i}]") for i, path in enumerate(cfg.rules)]
    if cfg.directives.strip():
        out.append(Source("text", cfg.directives, f"{key}.directives"))
    return out


def signature(cfg: Waf) -> tuple[object, ...]:
    """What makes two routes' rule sets the same: routes that agree share one compiled set."""
    return (
        int(cfg.body_limit),
        cfg.inspect_response,
        cfg.paranoia_level,
        cfg.inbound_threshold,
        cfg.outbound_threshold,
        tuple(cfg.exclude_rules),
        tuple((e.path, tuple(e.rules), tuple(e.args)) for e in cfg.exclusions),
        cfg.crs,
        cfg.crs_setup,
        tuple(cfg.rules),
        cfg.directives,
    )


class Verdict(NamedTuple):
    """What a transaction came to: block it (or would, in detect mode), and why."""

    block: bool
    status: int
    rules: tuple[int, ...]  # every rule that matched, in order
    score_rules: tuple[int, ...]  # the matches that are not the threshold evaluation


def verdict(status: int | None, matched: list[int]) -> Verdict:
    """``status``: the intervention ModSecurity asked for (None for none)."""
    rules = tuple(matched)
    scoring = tuple(r for r in rules if r not in EVALUATION_RULES)
    if status is None or status < 400:
        return Verdict(False, 200, rules, scoring)
    return Verdict(True, status, rules, scoring)
