"""The README's first command runs the demo from a fresh copy of the repository, with no
virtual environment made beforehand: ``bash scripts/demo.sh`` makes ``.venv``, installs
Portico with its demo extra, and serves three Flask instances. Its listen address is moved
to a free port (``LISTEN``), the only change from what a user runs.

The copy holds the files git tracks, as a clean clone would, taken from the working tree so
the test checks what is about to be committed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.processes import ManagedProcess
from tests.support.rawhttp import RawConnection
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
# Making a venv and installing Flask and gunicorn into it: generous on a loaded machine.
INSTALL_TIMEOUT = 300.0


def readme_commands() -> list[str]:
    """The ``sh`` blocks of the README, in order."""
    return re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def fresh_copy(dest: Path) -> Path:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


def test_the_readme_commands_are_the_demo_and_the_test_script() -> None:
    first, second = readme_commands()[:2]
    assert first.strip() == "bash scripts/demo.sh"
    assert second.strip() == "bash scripts/test.sh"
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_the_readme_demo_runs_from_a_fresh_copy(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the tracked files")
    repo = fresh_copy(tmp_path / "portico")
    assert not (repo / ".venv").exists()
    port = free_port()
    demo = ManagedProcess(
        ["bash", "-c", readme_commands()[0]],
        cwd=repo,
        env={"LISTEN": f"127.0.0.1:{port}", "VIRTUAL_ENV": "", "PIP_USER": "0"},
        name="demo",
    ).start()
    try:

        def first_ready() -> bool:
            if not demo.alive():
                pytest.fail(f"the demo exited:\n{demo.output()}")
            return "ready: taking traffic" in demo.output()

        wait_until(first_ready, INSTALL_TIMEOUT, message="the demo's first instance ready")
        wait_until(lambda: demo.output().count("ready: taking traffic") >= 3, 60, message="3 ready")
        with RawConnection(port, timeout=10) as conn:
            response = conn.request("GET", "/whoami")
        assert response.status == 200, response.raw
        assert (repo / ".venv" / "bin" / "portico").exists()
        demo.signal(signal.SIGINT)  # Ctrl-C stops everything
        assert demo.wait(60) == 0
    finally:
        demo.stop(timeout=30)
