"""Optional accelerated build: ``PORTICO_COMPILE=1`` compiles the data plane's hot modules
with mypyc (the pure-Python modules stay the fallback, and are what a plain install uses).

    pip install mypy setuptools wheel        # the compiler, once, into the same environment
    PORTICO_COMPILE=1 pip install --no-build-isolation .

mypyc compiles from the type annotations the code already has (``mypy --strict`` clean), so
the compiled and pure builds are the same source; the test command runs the suite on both.
``--no-build-isolation`` because mypyc type-checks the modules against the installed
dependencies (pydantic, uvloop, httptools). Measured gain: docs/performance.md.
"""

from __future__ import annotations

import os

from setuptools import setup

# The modules a proxied request runs through, request head to finish. Everything else (config,
# control plane, CLI) runs once or rarely and stays interpreted. A class from this list that
# other modules subclass (Stage, BodyFilter, Hold) is marked allow_interpreted_subclasses.
HOT_MODULES = [
    "codec/events",
    "codec/headers",
    "codec/parser",
    "codec/paths",
    "codec/writer",
    "dataplane/clock",
    "dataplane/connection",
    "dataplane/context",
    "dataplane/exchange",
    "dataplane/forwarding",
    "dataplane/metrics",
    "dataplane/outliers",
    "dataplane/pipeline",
    "dataplane/proxy",
    "dataplane/static",
    "dataplane/timers",
    "dataplane/upstream",
    "policy/balancers",
    "policy/candidate",
    "policy/encoding",
    "policy/files",
    "policy/health",
    "policy/ratelimit",
    "policy/retry",
    "runtime/compress",
    "runtime/endpoint",
    "runtime/limittable",
    "runtime/request",
    "runtime/routes",
    "runtime/snapshot",
    "runtime/stages",
    "runtime/static",
    "runtime/traffic",
]


def _ext_modules() -> list[object]:
    if os.environ.get("PORTICO_COMPILE") != "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        raise SystemExit(
            "PORTICO_COMPILE=1 needs mypyc: pip install mypy setuptools wheel, then "
            "PORTICO_COMPILE=1 pip install --no-build-isolation ."
        ) from exc
    paths = [f"src/portico/{m}.py" for m in HOT_MODULES]
    return list(mypycify(paths, opt_level="3", group_name="portico_compiled"))


setup(ext_modules=_ext_modules())
