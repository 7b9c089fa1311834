"""App mistakes are caught before the first start and named, and `portico check` looks at the
machine, not only the schema. Real processes: ``python -m portico`` refusing to start, and
serving apps that ignore their port or crash on start.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PorticoFactory
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess
from tests.support.rawhttp import RawConnection
from tests.support.waiting import wait_for_port, wait_until


def portico_cmd(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portico", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def refused(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result
    assert result.stderr.strip().splitlines() == [f"portico: cannot start: {expected}"], result
    assert "Traceback" not in result.stderr


def test_wsgi_module_that_does_not_import_is_named_before_any_start(tmp_path: Path) -> None:
    # The README's command without --cwd, run from a directory without app.py.
    result = portico_cmd(
        "run", "--listen", f"127.0.0.1:{free_port()}", "--wsgi", "app:app", cwd=tmp_path
    )
    refused(
        result,
        f"upstreams.default.app.wsgi: app:app does not import in {tmp_path}:"
        " ModuleNotFoundError: No module named 'app'",
    )
    (tmp_path / "app.py").write_text("import flask\nother = 1\n")
    result = portico_cmd(
        "run", "--listen", f"127.0.0.1:{free_port()}", "--wsgi", "app:app", cwd=tmp_path
    )
    refused(
        result,
        f"upstreams.default.app.wsgi: app:app does not import in {tmp_path}:"
        " module 'app' has no attribute 'app'",
    )


def test_missing_cwd_and_command_are_named(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    missing = tmp_path / "nope"
    refused(
        portico_cmd("run", "--listen", listen, "--wsgi", "app:app", "--cwd", missing),
        f"upstreams.default.app.cwd: no such directory: {missing}",
    )
    refused(
        portico_cmd("run", "--listen", listen, "--", "portico-no-such-command", "{port}"),
        "upstreams.default.app.command: 'portico-no-such-command' not found on PATH",
    )
    refused(
        portico_cmd("run", "--listen", listen, "--cwd", tmp_path, "--", "./serve.sh"),
        f"upstreams.default.app.command: no such file: {tmp_path / 'serve.sh'}",
    )


def app_config(command: list[str], **app: Any) -> dict[str, Any]:
    return {"upstreams": {"default": {"app": {"command": command, **app}}}}


def test_an_instance_not_listening_on_its_port_is_diagnosed_within_its_timeout(
    portico: PorticoFactory,
) -> None:
    wrong = free_port()
    command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(wrong)]
    ready_timeout = 4.0
    proxy = portico(app_config(command, ready_timeout=ready_timeout, backoff_initial=5))
    started = time.monotonic()
    expected = f"but on {wrong}: the command must use {{port}} or $PORT"
    wait_until(lambda: expected in proxy.output(), ready_timeout + 5, message="the diagnosis")
    assert time.monotonic() - started < ready_timeout + 2
    line = next(x for x in proxy.output().splitlines() if expected in x)
    assert "is not listening on its port" in line


@pytest.mark.parametrize("workers", [1, 2])
def test_a_crash_looping_app_names_its_cause_and_clients_get_a_reason(
    portico: PorticoFactory, workers: int
) -> None:
    crash = "import sys; print('starting', flush=True); raise RuntimeError('database unreachable')"
    config = app_config(
        [sys.executable, "-c", crash],
        backoff_initial=0.1,
        backoff_max=0.5,
        crash_loop_after=3,
    )
    # With workers the master sees the crash loop; the reason reaches every worker's 503s.
    config.setdefault("server", {})["workers"] = workers
    proxy = portico(config)
    wait_until(lambda: "is crash-looping" in proxy.output(), 20, message="the crash loop")
    crashes = [x for x in proxy.output().splitlines() if "exited with 1" in x]
    assert "(RuntimeError: database unreachable)" in crashes[0], crashes
    assert "RuntimeError: database unreachable" in next(
        x for x in proxy.output().splitlines() if "is crash-looping" in x
    )
    for _ in range(4):  # fresh connections: with workers, each may land on another one
        with RawConnection(proxy.port) as conn:
            response = conn.request("GET", "/")
        assert response.status == 503
        assert response.header("Portico-Reason") == "default is crash-looping"


DOCUMENTED = """
[server]
listen = "127.0.0.1:{port}"

[access_log]
format = "combined"
path = "{log}"

[upstreams.app]
backends = ["http://127.0.0.1:5001"]
"""


def test_check_refuses_an_unwritable_access_log_path(tmp_path: Path) -> None:
    config = tmp_path / "portico.toml"
    log = tmp_path / "logs" / "access.log"
    config.write_text(DOCUMENTED.format(port=free_port(), log=log))
    result = portico_cmd("check", config)
    assert result.returncode == 1, result
    assert result.stdout.strip() == f"access_log.path: directory {log.parent} does not exist"
    log.parent.mkdir()
    assert portico_cmd("check", config).returncode == 0


def test_check_strict_refuses_a_busy_port(tmp_path: Path) -> None:
    port = free_port()
    holder = ManagedProcess(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], name="holder"
    ).start()
    try:
        wait_for_port(port, timeout=10)
        config = tmp_path / "portico.toml"
        config.write_text(DOCUMENTED.format(port=port, log="-"))
        assert portico_cmd("check", config).returncode == 0, "ports only with --strict"
        result = portico_cmd("check", "--strict", config)
        assert result.returncode == 1
        assert result.stdout.startswith(
            f"server.listen[0]: cannot listen on 127.0.0.1:{port}: Address already in use"
        )
        assert f"held by process {holder.pid}" in result.stdout
    finally:
        holder.stop(timeout=5)
