"""Just enough of a TOML writer to turn a test's config dict into a file portico reads.

Handles nested tables, arrays of tables (a list whose items are all dicts), inline arrays of
strings, numbers, booleans and nested arrays/inline tables. ``None`` values are left out (TOML
has no null; leaving a key out means the schema default). Keys keep their order, scalars of a
table come before its sub-tables, as TOML requires.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# Characters a TOML basic string must escape: controls other than tab, DEL, quote, backslash.
_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def dumps(data: Mapping[str, object]) -> str:
    """``data`` as a TOML document."""
    lines: list[str] = []
    _table(data, (), lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(table: Mapping[str, object], path: tuple[str, ...], out: list[str]) -> None:
    subtables: list[tuple[str, Mapping[str, object]]] = []
    arrays_of_tables: list[tuple[str, Sequence[Mapping[str, object]]]] = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            subtables.append((key, value))
        elif _is_array_of_tables(value):
            arrays_of_tables.append((key, value))  # type: ignore[arg-type]
        else:
            out.append(f"{_key(key)} = {_value(value)}")
    for key, sub in subtables:
        sub_path = (*path, key)
        # A table holding only tables needs no header of its own: [a.b] defines [a].
        if not sub or any(v is not None and not _is_table_like(v) for v in sub.values()):
            out.extend(["", f"[{_dotted(sub_path)}]"])
        _table(sub, sub_path, out)
    for key, items in arrays_of_tables:
        sub_path = (*path, key)
        for item in items:
            out.extend(["", f"[[{_dotted(sub_path)}]]"])
            _table(item, sub_path, out)


def _is_table_like(value: object) -> bool:
    return isinstance(value, Mapping) or _is_array_of_tables(value)


def _is_array_of_tables(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(item, Mapping) for item in value)
    )


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items() if v is not None)
        return "{" + (f" {items} " if items else "") + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML: {value!r}")


def _string(text: str) -> str:
    parts = []
    for ch in text:
        if ch in _SHORT_ESCAPES:
            parts.append(_SHORT_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            parts.append(f"\\u{ord(ch):04X}")
        else:
            parts.append(ch)
    return '"' + "".join(parts) + '"'


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(_key(k) for k in path)
