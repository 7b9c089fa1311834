"""``python -m portico`` as a real subprocess: exit codes and exactly what it prints.

None of these start a server: each command either validates and stops (``check``) or refuses
its configuration before the gateway is imported (``serve``/``proxy`` with bad input). Every
subprocess is run to completion with a timeout, so none can outlive its test.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import portico
from portico.policy.balancers import BALANCERS

VALID = """\
[server]
listen = ["127.0.0.1:8080", "[::1]:8081"]
workers = 2

[upstreams.api]
balancer = "least_connections"
backends = ["http://127.0.0.1:5001", { url = "http://127.0.0.1:5002", weight = 3 }]

[upstreams.web]
backends = ["http://127.0.0.1:6001"]

[[routes]]
host = "api.example.com"
upstream = "api"

[[routes]]
path = "/"
upstream = "web"
"""

INVALID = """\
[server]
workers = 0
wrkers = 2

[upstreams.api]
backends = ["http://127.0.0.1:5001", "127.0.0.1:5002"]
"""

INVALID_LINES = [
    "server.workers: must be at least 1, got 0",
    "server.wrkers: unknown key (did you mean 'workers'?)",
    "upstreams.api.backends[1]: not a URL (expected http://host:port)",
]


def portico_cmd(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portico", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        check=False,
    )


Writer = Callable[[str, str], Path]


@pytest.fixture
def write(tmp_path: Path) -> Writer:
    """Write a file into this test's temporary directory and return its path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def test_check_valid_prints_a_summary(write: Writer, tmp_path: Path) -> None:
    write("portico.toml", VALID)
    result = portico_cmd("check", "portico.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "portico.toml: ok",
        "listen: 127.0.0.1:8080, [::1]:8081",
        "workers: 2",
        "upstreams:",
        "  api (least_connections): http://127.0.0.1:5001, http://127.0.0.1:5002 (weight 3)",
        "  web (round_robin): http://127.0.0.1:6001",
        "routes:",
        "  api.example.com/ -> api",
        "  */ -> web",
    ]
    assert result.stderr == ""


def test_check_summary_without_routes(write: Writer) -> None:
    path = write("one.toml", '[upstreams.app]\nbackends = ["http://127.0.0.1:5001"]\n')
    result = portico_cmd("check", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["routes:", "  (none: every request goes to app)"]


def test_check_invalid_prints_every_problem_and_exits_1(write: Writer) -> None:
    result = portico_cmd("check", write("bad.toml", INVALID))
    assert result.returncode == 1
    assert result.stdout.splitlines() == INVALID_LINES
    assert result.stderr == ""


def test_check_toml_syntax_error(write: Writer, tmp_path: Path) -> None:
    write("syntax.toml", '[server]\nworkers = 2\nlisten "x"\n')
    result = portico_cmd("check", "syntax.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "syntax.toml: invalid TOML at line 3, column 8: "
        "expected '=' after a key in a key/value pair"
    ]


def test_check_missing_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    result = portico_cmd("check", "absent.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["absent.toml: no such file"]
    assert "Traceback" not in result.stderr


def test_check_without_a_file_is_a_usage_error() -> None:
    result = portico_cmd("check")
    assert result.returncode == 2
    assert "Missing argument 'FILE'" in result.stderr


def test_serve_refuses_an_invalid_file_with_exit_2(write: Writer) -> None:
    result = portico_cmd("serve", "-c", write("bad.toml", INVALID))
    assert result.returncode == 2
    assert result.stderr.splitlines() == INVALID_LINES
    assert result.stdout == ""


def test_serve_workers_flag_is_validated_by_the_schema(write: Writer) -> None:
    result = portico_cmd("serve", "-c", write("ok.toml", VALID), "--workers", "0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["server.workers: must be at least 1, got 0"]


def test_serve_missing_file(tmp_path: Path) -> None:
    result = portico_cmd("serve", "--config", "absent.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["absent.toml: no such file"]


def test_proxy_refuses_bad_flags_with_key_paths() -> None:
    result = portico_cmd(
        "proxy",
        "--listen",
        "127.0.0.1",
        "--backend",
        "http://127.0.0.1:5001",
        "--backend",
        "127.0.0.1:5002",
        "--balancer",
        "fastest",
        "--access-log",
        "xml",
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "server.listen[0]: '127.0.0.1' has no port (expected host:port)",
        "access_log.format: must be 'off', 'common', 'combined' or 'json', got 'xml'",
        "upstreams.default.backends[1]: not a URL (expected http://host:port)",
        "upstreams.default.balancer: unknown balancer 'fastest' "
        f"(one of: {', '.join(sorted(BALANCERS))})",
    ]


def test_proxy_needs_a_backend() -> None:
    result = portico_cmd("proxy", "--listen", "127.0.0.1:8080")
    assert result.returncode == 2
    assert "Missing option '-b' / '--backend'" in result.stderr


def test_version() -> None:
    result = portico_cmd("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"portico, version {portico.__version__}"


def test_help_lists_the_commands() -> None:
    result = portico_cmd("--help")
    assert result.returncode == 0
    for command in ("check", "serve", "proxy", "run", "restart", "reload", "stop"):
        assert f"  {command} " in result.stdout
    # docs/cli.md documents every command the program has.
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for command in ("check", "serve", "proxy", "run", "restart", "reload", "stop"):
        assert f"`{command}" in doc, command
