"""Loading: a TOML file or a set of CLI flags becomes a validated ``Config``, or a ``ConfigError``.

Theory of operation. Every source is first turned into a plain dict of the same shape as the
TOML file; CLI flags and ``--workers``-style overrides are just more data written into that
dict. The dict then goes through ``Config.model_validate`` exactly once, so there is one schema
and one set of rules. pydantic's errors are translated here into ``(key_path, reason)`` pairs a
person can act on:

- paths are written the way the user would write the key: ``upstreams.api.backends[1]``;
- where the user gave a plain string that a validator expanded (a backend URL, a single
  listen address), the path stops at that string instead of naming the synthetic inner key;
- validators on a whole model report cross-key problems as ``some.path: reason`` lines,
  which are split into path and reason (``model.Config._routes_name_upstreams``);
- reasons are short and in TOML's vocabulary (table, array), not pydantic's.

Reading the file is the only I/O; everything else here is pure.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import tomllib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from portico.config.model import Config
from portico.errors import ConfigError

Problem = tuple[str, str]

#: The name ``portico proxy`` gives the one upstream its ``--backend`` flags fill.
FLAGS_UPSTREAM = "default"

#: What a problem is filed under when pydantic reports it against the whole document.
ROOT_PATH = "(top level)"

# A key TOML accepts without quotes; anything else is quoted in paths so that a dot inside an
# upstream name cannot be mistaken for nesting.
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

# "routes[0].upstream: reason" at the start of a validator's message line.
_PATH_PREFIX = re.compile(
    r"^(?P<path>[A-Za-z_][\w-]*(?:\[\d+\]|\.[A-Za-z_][\w-]*)*): (?P<reason>.+)$"
)

# tomllib puts the position at the end of its message: "... (at line 3, column 5)".
_TOML_POSITION = re.compile(
    r"^(?P<msg>.*) \((?P<where>at line \d+, column \d+|at end of document)\)$"
)


# --- sources ---------------------------------------------------------------------------------


def load_file(
    path: str | os.PathLike[str], overrides: Mapping[str, object] | None = None
) -> Config:
    """Read and validate a TOML config file; ``overrides`` maps dotted keys to values.

    Raises ``ConfigError`` for a missing or unreadable file, a TOML syntax error (path = the
    file name, reason = position and message) or any schema problem (path = the key).
    """
    source = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([(source, _os_reason(e))]) from None
    try:
        # utf-8-sig: tolerate the byte-order mark some Windows editors write.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError([(source, f"not UTF-8 text (bad byte at offset {e.start})")]) from None
    return load_text(text, source, overrides)


def load_text(
    text: str, source: str = "<string>", overrides: Mapping[str, object] | None = None
) -> Config:
    """Parse TOML ``text`` and validate it. ``source`` names the text in syntax errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([(source, _toml_reason(str(e)))]) from None
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data)


def config_from_flags(
    listen: Sequence[str] = (),
    backends: Sequence[str] = (),
    balancer: str | None = None,
    workers: int | None = None,
    access_log: str | None = None,
    tls_certs: Sequence[tuple[str, str]] = (),
) -> Config:
    """Build the config for ``portico proxy`` from its flags, through the same schema.

    Each flag is an override of one key, written into an empty document; a flag left as
    ``None`` (or an empty sequence) is not written, so the schema's default applies and no
    default is restated here. Errors carry the key path the flag fills (see ``flags``).
    """
    if not backends:
        raise ConfigError([(f"upstreams.{FLAGS_UPSTREAM}.backends", "at least one is needed")])
    flags: dict[str, object] = {
        "server.listen": list(listen) or None,
        "server.workers": workers,
        f"upstreams.{FLAGS_UPSTREAM}.backends": list(backends),
        f"upstreams.{FLAGS_UPSTREAM}.balancer": balancer,
        "access_log.format": access_log,
    }
    if tls_certs:  # the listen addresses speak HTTPS with these certificates
        certs = [{"cert": cert, "key": key} for cert, key in tls_certs]
        flags["tls"] = [{"listen": list(listen) or ["127.0.0.1:8443"], "certs": certs}]
        flags["server.listen"] = []
    return validate(apply_overrides({}, {k: v for k, v in flags.items() if v is not None}))


def config_for_app(
    app: Mapping[str, object],
    listen: Sequence[str] = (),
    access_log: str | None = None,
    pid_file: str | None = None,
    workers: int | None = None,
    shed: int | None = None,
) -> Config:
    """Build the config for ``portico run``: one upstream whose endpoints come from an app."""
    flags: dict[str, object] = {
        f"upstreams.{FLAGS_UPSTREAM}.shed": {"max_in_flight": shed} if shed is not None else None,
        "server.listen": list(listen) or None,
        "server.workers": workers,
        "server.pid_file": pid_file,
        f"upstreams.{FLAGS_UPSTREAM}.app": {k: v for k, v in app.items() if v is not None},
        "access_log.format": access_log,
    }
    return validate(apply_overrides({}, {k: v for k, v in flags.items() if v is not None}))


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, object]) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted key in ``overrides`` set to its value.

    ``{"server.workers": 4}`` sets ``data["server"]["workers"]``, creating tables on the way.
    The input is not modified. Raises ``ConfigError`` if a key on the way is not a table.
    """
    result: dict[str, Any] = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        table = result
        for depth, key in enumerate(keys[:-1]):
            child = table.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError([(where, f"expected a table, got {_show(child)}")])
            table = child
        table[keys[-1]] = value
    return result


def validate(data: Mapping[str, Any]) -> Config:
    """Validate a dict shaped like the TOML file; raise ``ConfigError`` with key paths."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(problems_from(e, data)) from None


# --- pydantic errors -> (path, reason) -------------------------------------------------------


def problems_from(error: ValidationError, data: object) -> list[Problem]:
    """Translate every error in ``error`` into ``(key_path, reason)`` pairs, in order.

    ``data`` is the input that was validated; it is used to tell where the user wrote a plain
    string that the schema expanded into a table.
    """
    problems: list[Problem] = []
    for err in _union_branches_dropped(error.errors(include_url=False), data):
        problems.extend(_translate(err, data))
    return problems


# Errors saying a value is not of a union member's type: for a union such as
# ``str | HeaderMatch`` they only mean "the user chose the other member".
_TYPE_MISMATCH = frozenset(
    {"string_type", "model_type", "model_attributes_type", "dict_type", "literal_error"}
)


def _union_tag(loc: tuple[str | int, ...], data: object, is_missing: bool) -> int | None:
    """The index in ``loc`` of a union member's tag (``str``, ``Redirect``, ...): a key
    that is not in the input where the input is a table (or is not a table at all)."""
    node = data
    last = len(loc) - 1
    for i, part in enumerate(loc):
        if isinstance(part, int):
            if not isinstance(node, list) or not 0 <= part < len(node):
                return None
            node = node[part]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        elif i == last and is_missing:
            return None  # a required key left out, not a tag
        else:
            return i
    return None


def _union_branches_dropped(errors: list[ErrorDetails], data: object) -> list[ErrorDetails]:
    """pydantic reports a failed union once per member, with the member's tag in the path.
    Keep the errors of the member the user meant (drop "not a string" when a table was
    given), and take the tag out of the path."""
    tagged: list[tuple[ErrorDetails, int | None]] = [
        (err, _union_tag(err["loc"], data, err["type"] == "missing")) for err in errors
    ]
    out: list[ErrorDetails] = []
    kept: set[int] = set()
    for err, tag in tagged:
        if tag is None:
            out.append(err)
            continue
        loc = err["loc"]
        mismatch = err["type"] in _TYPE_MISMATCH and len(loc) == tag + 1
        siblings = [
            e for e, t in tagged if t == tag and e is not err and e["loc"][:tag] == loc[:tag]
        ]
        if mismatch and any(
            not (e["type"] in _TYPE_MISMATCH and len(e["loc"]) == tag + 1) for e in siblings
        ):
            continue  # another member has the real problem
        if mismatch and any(id(e) in kept for e in siblings):
            continue  # every member mismatched: one report is enough
        kept.add(id(err))
        trimmed = dict(err)
        trimmed["loc"] = (*loc[:tag], *loc[tag + 1 :])
        out.append(trimmed)  # type: ignore[arg-type]
    return out


def format_path(loc: Sequence[str | int]) -> str:
    """``("upstreams", "api", "backends", 1)`` -> ``upstreams.api.backends[1]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.match(part) else _quote(part)
            out += f".{key}" if out else key
    return out


def _translate(err: ErrorDetails, data: object) -> list[Problem]:
    loc = _user_loc(err["loc"], data)
    base = format_path(loc)
    kind = err["type"]
    if kind in ("value_error", "assertion_error"):
        return [_split_line(base, line) for line in _validator_message(err).splitlines()]
    return [(base or ROOT_PATH, _reason(err))]


def _validator_message(err: ErrorDetails) -> str:
    # The original exception has the text without pydantic's "Value error, " decoration.
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, BaseException) and str(cause):
        return str(cause)
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def _split_line(base: str, line: str) -> Problem:
    """A line ``some.path: reason`` names a path relative to the model that raised it."""
    m = _PATH_PREFIX.match(line)
    if m is None:
        return base or ROOT_PATH, line
    rel = m["path"]
    if not base:
        path = rel
    elif rel.startswith("["):
        path = base + rel
    else:
        path = f"{base}.{rel}"
    return path, m["reason"]


def _user_loc(loc: tuple[str | int, ...], data: object) -> tuple[str | int, ...]:
    """Cut ``loc`` where the user's input was a string the schema expanded.

    ``backends = ["http://a"]`` becomes ``[{url = "http://a"}]`` and ``listen = "h:p"``
    becomes ``["h:p"]`` before validation; an error inside them should name what the user
    wrote (``backends[0]``, ``listen``), not ``backends[0].url`` or ``listen[0]``.
    """
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, str):
            return loc[:i]
        if isinstance(node, Mapping) and isinstance(part, str):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, Mapping) and part == 0:
            # One table where the schema takes a list of them (``rate_limit = {...}``).
            return loc[:i] + _user_loc(loc[i + 1 :], node)
        else:
            return loc
    return loc


def _reason(err: ErrorDetails) -> str:
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    got = f", got {_show(err['input'])}"
    match kind:
        case "extra_forbidden":
            return "unknown key" + _key_hint(err["loc"])
        case "missing":
            return "required"
        case "int_type" | "int_parsing" | "int_from_float":
            return "expected an integer" + got
        case "float_type" | "float_parsing" | "finite_number":
            return "expected a number" + got
        case "bool_type" | "bool_parsing":
            return "expected true or false" + got
        case "string_type":
            return "expected a string" + got
        case "list_type":
            return "expected an array" + got
        case "dict_type" | "model_type" | "model_attributes_type":
            return "expected a table" + got
        case "greater_than":
            return f"must be greater than {_number(ctx['gt'])}" + got
        case "greater_than_equal":
            return f"must be at least {_number(ctx['ge'])}" + got
        case "less_than":
            return f"must be less than {_number(ctx['lt'])}" + got
        case "less_than_equal":
            return f"must be at most {_number(ctx['le'])}" + got
        case "literal_error":
            return f"must be {ctx['expected']}" + got
        case "string_pattern_mismatch":
            return f"must match the pattern {ctx['pattern']}" + got
        case "byte_size" | "byte_size_unit":
            return 'not a size (expected bytes as an integer, or a string like "10MiB")' + got
        case "too_short":
            return "must not be empty"
    # Anything not mapped above still reads acceptably once pydantic's phrasing is softened.
    msg = err["msg"].removeprefix("Input should be ")
    if msg != err["msg"]:
        return f"must be {msg}" + got
    return msg[:1].lower() + msg[1:]


def _key_hint(loc: tuple[str | int, ...]) -> str:
    """Suggest the key the user probably meant, or list the keys this table accepts."""
    known = _fields_at(loc[:-1])
    if not known:
        return ""
    key = loc[-1]
    if isinstance(key, str):
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return f" (expected one of: {', '.join(known)})"


def _fields_at(loc: Sequence[str | int]) -> list[str]:
    """The keys of the schema table at ``loc``, found by walking the model's annotations."""
    node: Any = Config
    for part in loc:
        node = _unwrap(node)
        origin = get_origin(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            node = field.annotation
        elif origin is dict:
            node = get_args(node)[1]
        elif origin is list:
            node = get_args(node)[0]
        else:
            return []
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated[...]`` and ``X | None`` down to the type that holds the keys."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


# --- small helpers ---------------------------------------------------------------------------


def _os_reason(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(e, PermissionError):
        return "permission denied"
    return (e.strerror or str(e)).lower()


def _toml_reason(message: str) -> str:
    """``Invalid value (at line 3, column 5)`` -> ``invalid TOML at line 3, column 5: ...``."""
    m = _TOML_POSITION.match(message)
    if m is None:
        return f"invalid TOML: {message}"
    msg = m["msg"]
    return f"invalid TOML {m['where']}: {msg[:1].lower()}{msg[1:]}"


def _number(value: object) -> str:
    """``0.0`` -> ``0``: bounds on float fields read as the integers they were written as."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quote(key: str) -> str:
    escaped = key.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _show(value: object) -> str:
    """A value as the user wrote it in TOML, short enough for one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
