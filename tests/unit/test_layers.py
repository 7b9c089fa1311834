"""Imports flow one way (../shared/STYLE.md): a module imports only from its layer or below.

Checked on module-level imports, parsed from source. Imports inside functions are allowed as
the documented escape hatch (config validators asking policy for its registry of names).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "portico"

# Lower number = lower layer. Endpoint is a plain data type that policies read, so it sits
# with the pure layers rather than with the compiled snapshot.
RANKS = {
    "portico.errors": 0,
    "portico.config": 1,
    "portico.codec": 2,
    "portico.runtime.endpoint": 2,
    "portico.runtime.events": 2,
    "portico.policy": 3,
    "portico.runtime": 4,
    "portico.dataplane": 5,
    "portico.control": 6,
    "portico.gateway": 7,
    "portico.cli": 8,
    "portico.__main__": 9,
    "portico": 0,  # the package's own __init__ (version only)
}

PURE = ("portico.codec", "portico.policy", "portico.runtime", "portico.config", "portico.errors")
IO_MODULES = {"asyncio", "socket", "ssl", "subprocess", "selectors"}


def rank(module: str) -> int:
    best = ""
    for prefix in RANKS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    return RANKS[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are types only
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_imports_flow_one_way() -> None:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        mod = module_name(path)
        for imported in top_level_imports(path):
            if imported.startswith("portico") and rank(imported) > rank(mod):
                problems.append(f"{mod} imports {imported} (a higher layer)")
    assert problems == []


def test_pure_layers_do_no_io() -> None:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        mod = module_name(path)
        if not mod.startswith(PURE):
            continue
        for imported in top_level_imports(path):
            if imported.split(".")[0] in IO_MODULES:
                problems.append(f"{mod} imports {imported}")
    assert problems == []
