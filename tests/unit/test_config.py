"""Config loading: TOML text and flags in, a Config or exact (key path, reason) pairs out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from portico.config.load import (
    FLAGS_UPSTREAM,
    apply_overrides,
    config_from_flags,
    format_path,
    load_file,
    load_text,
    validate,
)
from portico.config.model import Config
from portico.config.types import parse_hostport
from portico.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

MINIMAL = """
[upstreams.app]
backends = ["http://127.0.0.1:5001"]
"""


def problems_of(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_text(text, "test.toml")
    problems: list[tuple[str, str]] = info.value.problems
    return problems


def problem_of(text: str) -> tuple[str, str]:
    (problem,) = problems_of(text)
    return problem


def with_app(text: str) -> str:
    """``text`` plus a valid upstream, so only the problem under test is reported."""
    return text + "\n" + MINIMAL


# --- valid configs ---------------------------------------------------------------------------


def test_minimal_file_takes_every_default() -> None:
    config = load_text(MINIMAL)
    assert config.server.listen == ["127.0.0.1:8080"]
    assert config.server.workers == 1
    assert config.server.limits.max_body_bytes is None
    assert config.access_log.format == "off"
    assert config.upstreams["app"].balancer == "round_robin"
    assert config.upstreams["app"].backends[0].url == "http://127.0.0.1:5001"
    assert config.upstreams["app"].backends[0].weight == 1
    assert config.upstreams["app"].backends[0].address == ("127.0.0.1", 5001)
    (route,) = config.effective_routes()
    assert (route.upstream, route.path, route.host) == ("app", "/", None)


def test_backends_as_strings_inline_tables_and_arrays_of_tables() -> None:
    config = load_text(
        """
        [upstreams.a]
        backends = ["http://h1:1", { url = "http://h2:2", weight = 5 }]

        [[upstreams.b.backends]]
        url = "http://h3"
        weight = 2

        [[routes]]
        path = "/a"
        upstream = "a"

        [[routes]]
        host = "b.example"
        upstream = "b"
        """
    )
    assert [(b.url, b.weight) for b in config.upstreams["a"].backends] == [
        ("http://h1:1", 1),
        ("http://h2:2", 5),
    ]
    (b,) = config.upstreams["b"].backends
    assert (b.address, b.weight) == (("h3", 80), 2)
    assert [(r.path, r.host, r.upstream) for r in config.routes] == [
        ("/a", None, "a"),
        ("/", "b.example", "b"),
    ]


def test_documented_example_is_valid() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    assert blocks, "docs/configuration.md has no TOML examples"
    for block in blocks[:-1]:
        # The smaller snippets are fragments; each must at least be valid TOML with a backend.
        load_text(block if "[upstreams" in block else MINIMAL + block)
    full = load_text(blocks[-1])
    assert full.server.limits.max_body_bytes == 10 * 1024 * 1024
    assert set(full.upstreams) == {"api", "web"}


def test_every_key_is_documented() -> None:
    schema = Config.model_json_schema()
    keys = set(schema["properties"])
    for definition in schema["$defs"].values():
        keys |= set(definition.get("properties", {}))
    text = DOCS.read_text()
    # A key is documented as `key` in a table row, or as a table heading like `[server.limits]`.
    missing = sorted(
        k for k in keys if not re.search(rf"`\[{{0,2}}(?:[\w.]+\.)?{k}\]{{0,2}}`", text)
    )
    assert missing == []


# --- listen addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:9000", ("::1", 9000)),
        (":80", ("0.0.0.0", 80)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


def test_listen_accepts_one_string_or_many() -> None:
    assert load_text(with_app('[server]\nlisten = "0.0.0.0:80"')).server.listen == ["0.0.0.0:80"]
    config = load_text(with_app('[server]\nlisten = ["127.0.0.1:1", "[::1]:2"]'))
    assert config.server.listen == ["127.0.0.1:1", "[::1]:2"]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ('"localhost"', ("server.listen", "'localhost' has no port (expected host:port)")),
        (
            '["127.0.0.1:80", "h:99999"]',
            ("server.listen[1]", "'h:99999': port must be a number from 0 to 65535"),
        ),
        ('["[::1:80"]', ("server.listen[0]", "'[::1:80' is not host:port")),
        ("[]", ("server.listen", "at least one listen address is needed")),
        ("8080", ("server.listen", "expected an array, got 8080")),
    ],
)
def test_bad_listen(listen: str, expected: tuple[str, str]) -> None:
    assert problem_of(with_app(f"[server]\nlisten = {listen}")) == expected


# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("1048576", 1048576),
        ("0", 0),
        ('"10MiB"', 10 * 1024**2),
        ('"10 MB"', 10 * 1000**2),
        ('"1.5KiB"', 1536),
        ('"512kb"', 512_000),
        ('"2GiB"', 2 * 1024**3),
        ('"100"', 100),
        ('"100 B"', 100),
    ],
)
def test_sizes(size: str, expected: int) -> None:
    config = load_text(with_app(f"[server.limits]\nmax_body_bytes = {size}"))
    assert config.server.limits.max_body_bytes == expected


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ('"10k"', "'10k': unknown unit 'k' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"),
        ('"8kbit"', "'8kbit': unknown unit 'kbit' (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"),
        ('"10MiB oops"', "'10MiB oops' is not a size (expected a string such as \"10MiB\")"),
        ('"lots"', "'lots' is not a size (expected a string such as \"10MiB\")"),
        ("-1", "must be at least 0, got -1"),
        ("1.5", 'expected a whole number of bytes or a string such as "10MiB"'),
        ("true", 'expected a whole number of bytes or a string such as "10MiB"'),
    ],
)
def test_bad_sizes(size: str, reason: str) -> None:
    problem = problem_of(with_app(f"[server.limits]\nmax_body_bytes = {size}"))
    assert problem == ("server.limits.max_body_bytes", reason)


# --- every kind of problem, with its exact path ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys, at every depth, with a suggestion or the list of known keys
        ("[server]\nwrkers = 2", ("server.wrkers", "unknown key (did you mean 'workers'?)")),
        (
            "bogus = 1",
            (
                "bogus",
                "unknown key (expected one of: server, forwarding, access_log, upstreams, routes, "
                "request_id, rate_limit, concurrency, ip_allow, ip_deny, redis, traffic, tls, "
                "https_redirect, hsts, kubernetes, admin)",
            ),
        ),
        (
            "[upstreams.app.timeouts]\nconect = 1",
            ("upstreams.app.timeouts.conect", "unknown key (did you mean 'connect'?)"),
        ),
        (
            '[[upstreams.x.backends]]\nurl = "http://h:1"\nwieght = 2',
            ("upstreams.x.backends[0].wieght", "unknown key (did you mean 'weight'?)"),
        ),
        # numbers and ranges
        ("[server]\nworkers = 0", ("server.workers", "must be at least 1, got 0")),
        ("[server]\nworkers = 257", ("server.workers", "must be at most 256, got 257")),
        ("[server]\nworkers = 1.5", ("server.workers", "expected an integer, got 1.5")),
        ('[server]\nworkers = "four"', ("server.workers", "expected an integer, got 'four'")),
        ("[server]\nbacklog = 0", ("server.backlog", "must be greater than 0, got 0")),
        (
            "[server.timeouts]\nheader = 0",
            ("server.timeouts.header", "must be greater than 0, got 0"),
        ),
        (
            '[server.timeouts]\nkeepalive = "30s"',
            ("server.timeouts.keepalive", "expected a number, got '30s'"),
        ),
        (
            "[server]\nshutdown_grace = -1",
            ("server.shutdown_grace", "must be at least 0, got -1"),
        ),
        # types of tables and arrays
        ("server = 5", ("server", "expected a table, got 5")),
        ("routes = 5", ("routes", "expected an array, got 5")),
        ("[forwarding]\nvia = 1.5", ("forwarding.via", "expected true or false, got 1.5")),
        # enumerations and patterns
        (
            '[access_log]\nformat = "xml"',
            ("access_log.format", "must be 'off', 'common', 'combined' or 'json', got 'xml'"),
        ),
        (
            '[forwarding]\nvia_name = "my proxy"',
            (
                "forwarding.via_name",
                "'my proxy' is not an HTTP token (letters, digits and !#$%&'*+-.^_`|~)",
            ),
        ),
        (
            '[forwarding]\ntrusted_proxies = ["10.0.0.0/8", "office"]',
            ("forwarding.trusted_proxies[1]", "'office' is not an IP network"),
        ),
    ],
)
def test_problem_paths(text: str, expected: tuple[str, str]) -> None:
    assert problem_of(with_app(text)) == expected


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        # A plain string is reported at its own index, not at a synthetic ".url".
        ('"127.0.0.1:5002"', ("[1]", "not a URL (expected http://host:port)")),
        ('"http://h:99999"', ("[1]", "not a URL: bad port")),
        (
            '"http://h:1/api"',
            ("[1]", "a backend URL names a server only (no path, query or fragment)"),
        ),
        # A table names the key inside it.
        ('{ url = "ftp://h" }', ("[1].url", "not a URL (expected http://host:port)")),
        ('{ url = "http://h:1", weight = 0 }', ("[1].weight", "must be at least 1, got 0")),
        ("{ weight = 2 }", ("[1].url", "required")),
        ("5", ("[1]", "expected a table, got 5")),
    ],
)
def test_backend_problem_paths(backend: str, expected: tuple[str, str]) -> None:
    text = f'[upstreams.api]\nbackends = ["http://127.0.0.1:5001", {backend}]'
    suffix, reason = expected
    assert problem_of(text) == (f"upstreams.api.backends{suffix}", reason)


def test_unknown_balancer() -> None:
    from portico.policy.balancers import BALANCERS

    # The list of names grows with the registry; "fastest" is not and will not be one.
    assert problem_of('[upstreams.api]\nbalancer = "fastest"') == (
        "upstreams.api.balancer",
        f"unknown balancer 'fastest' (one of: {', '.join(sorted(BALANCERS))})",
    )


def test_every_problem_is_reported_at_once() -> None:
    text = """
    [server]
    workers = 0
    wrkers = 2

    [access_log]
    format = "xml"

    [upstreams.api]
    backends = ["http://h:1", "nope", { url = "http://h:2", weight = 0 }]
    """
    assert problems_of(text) == [
        ("server.workers", "must be at least 1, got 0"),
        ("server.wrkers", "unknown key (did you mean 'workers'?)"),
        ("access_log.format", "must be 'off', 'common', 'combined' or 'json', got 'xml'"),
        ("upstreams.api.backends[1]", "not a URL (expected http://host:port)"),
        ("upstreams.api.backends[2].weight", "must be at least 1, got 0"),
    ]


def test_upstream_names_that_are_not_bare_keys_are_quoted() -> None:
    text = '[upstreams."my.api"]\nbackends = ["nope"]'
    assert problem_of(text) == (
        'upstreams."my.api".backends[0]',
        "not a URL (expected http://host:port)",
    )


# --- rules across keys (model-level validators) ----------------------------------------------


def test_no_upstreams() -> None:
    assert problem_of("[server]\nworkers = 2") == (
        "upstreams",
        "at least one upstream is needed",
    )


def test_routes_naming_missing_upstreams_are_all_reported() -> None:
    text = """
    [upstreams.api]
    [upstreams.web]
    [[routes]]
    upstream = "api"
    [[routes]]
    upstream = "apj"
    [[routes]]
    path = "/static"
    upstream = "static"
    """
    assert problems_of(text) == [
        ("routes[1].upstream", "no upstream named 'apj' (have: api, web)"),
        ("routes[2].upstream", "no upstream named 'static' (have: api, web)"),
    ]


def test_several_upstreams_need_routes() -> None:
    assert problem_of("[upstreams.a]\n[upstreams.b]") == (
        "routes",
        "several upstreams need routes saying which gets what",
    )


def test_route_fields() -> None:
    text = with_app('[[routes]]\npath = "api"')
    assert problems_of(text) == [("routes[0].path", "must start with '/'")]
    text = with_app('[[routes]]\npath = "/api"')
    assert problems_of(text) == [
        ("routes[0]", "give exactly one of upstream, split, redirect, respond or static")
    ]


# --- TOML syntax and files -------------------------------------------------------------------


def test_toml_syntax_error_names_the_file_and_position() -> None:
    assert problems_of('[server]\nworkers = 2\nlisten "x"\n') == [
        (
            "test.toml",
            "invalid TOML at line 3, column 8: expected '=' after a key in a key/value pair",
        )
    ]


def test_duplicate_key_is_a_syntax_error() -> None:
    ((path, reason),) = problems_of("[server]\nworkers = 1\nworkers = 2\n")
    assert path == "test.toml"
    assert reason.startswith("invalid TOML at line 3")


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "portico.toml"
    path.write_text(MINIMAL)
    assert load_file(path).upstreams["app"].backends[0].url == "http://127.0.0.1:5001"
    assert load_file(str(path), {"server.workers": 3}).server.workers == 3


def test_load_file_accepts_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "portico.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert "app" in load_file(path).upstreams


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "missing.toml", "no such file"),
        (lambda d: d, "is a directory, not a file"),
    ],
)
def test_unreadable_files(tmp_path: Path, make: Any, reason: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert info.value.problems == [(str(path), reason)]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n[upstreams.a]\n")
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert info.value.problems == [(str(path), "not UTF-8 text (bad byte at offset 5)")]


def test_config_error_message_joins_problems() -> None:
    with pytest.raises(ConfigError, match=r"^upstreams: at least one upstream is needed$"):
        validate({})


# --- overrides and flags ---------------------------------------------------------------------


def test_apply_overrides_copies_and_creates_tables() -> None:
    data: dict[str, Any] = {"server": {"workers": 1}}
    result = apply_overrides(data, {"server.workers": 4, "access_log.format": "json"})
    assert result == {"server": {"workers": 4}, "access_log": {"format": "json"}}
    assert data == {"server": {"workers": 1}}


def test_apply_overrides_refuses_to_descend_into_a_value() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"server": 5}, {"server.workers": 4})
    assert info.value.problems == [("server", "expected a table, got 5")]


def test_override_errors_name_the_overridden_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_text(MINIMAL, overrides={"server.workers": 0})
    assert info.value.problems == [("server.workers", "must be at least 1, got 0")]


def test_flags_build_the_same_config_as_a_file() -> None:
    from_flags = config_from_flags(
        listen=["127.0.0.1:9000"],
        backends=["http://127.0.0.1:5001", "http://127.0.0.1:5002"],
        balancer="least_connections",
        workers=2,
        access_log="json",
    )
    from_file = load_text(
        f"""
        [server]
        listen = ["127.0.0.1:9000"]
        workers = 2
        [access_log]
        format = "json"
        [upstreams.{FLAGS_UPSTREAM}]
        balancer = "least_connections"
        backends = ["http://127.0.0.1:5001", "http://127.0.0.1:5002"]
        """
    )
    assert from_flags == from_file


def test_flags_left_out_keep_the_schema_defaults() -> None:
    config = config_from_flags(listen=[], backends=["http://127.0.0.1:5001"])
    assert config == load_text(
        f'[upstreams.{FLAGS_UPSTREAM}]\nbackends = ["http://127.0.0.1:5001"]'
    )


def test_flag_problems_carry_key_paths() -> None:
    from portico.policy.balancers import BALANCERS

    with pytest.raises(ConfigError) as info:
        config_from_flags(
            listen=["127.0.0.1"],
            backends=["http://127.0.0.1:5001", "127.0.0.1:5002"],
            balancer="fastest",
            workers=0,
            access_log="xml",
        )
    assert info.value.problems == [
        ("server.listen[0]", "'127.0.0.1' has no port (expected host:port)"),
        ("server.workers", "must be at least 1, got 0"),
        ("access_log.format", "must be 'off', 'common', 'combined' or 'json', got 'xml'"),
        ("upstreams.default.backends[1]", "not a URL (expected http://host:port)"),
        (
            "upstreams.default.balancer",
            f"unknown balancer 'fastest' (one of: {', '.join(sorted(BALANCERS))})",
        ),
    ]


def test_flags_need_a_backend() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_flags(listen=[], backends=[])
    assert info.value.problems == [("upstreams.default.backends", "at least one is needed")]


# --- path formatting -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loc", "text"),
    [
        (("upstreams", "api", "backends", 1), "upstreams.api.backends[1]"),
        (("routes", 0, "upstream"), "routes[0].upstream"),
        (("upstreams", "a b"), 'upstreams."a b"'),
        (("upstreams", 'q"'), 'upstreams."q\\""'),
        ((), ""),
    ],
)
def test_format_path(loc: tuple[str | int, ...], text: str) -> None:
    assert format_path(loc) == text
