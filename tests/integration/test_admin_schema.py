"""The admin API against its own OpenAPI document, with schemathesis (PyPI) over real sockets:
every operation is called with generated valid and invalid input, with the token, and every
answer's status, content type and body must be what ``/api/openapi.json`` says."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.admin import TOKEN, with_admin
from tests.support.fleet import app_config, fleet

# Bounds of the run: examples per operation and seconds in all (fuzzing stops at the budget).
MAX_EXAMPLES = 10
MAX_SECONDS = 45


@pytest.mark.skipif(
    importlib.util.find_spec("schemathesis") is None,
    reason="schemathesis is not installed (pip install -e '.[test]')",
)
def test_api_matches_its_openapi_document(
    portico: PorticoFactory, raw_backend: RawBackendFactory, tmp_path: Path
) -> None:
    a, b = fleet(raw_backend, "a", "b")
    config: dict[str, Any] = with_admin(app_config([a.url, b.url]))
    portico(config)
    base = f"http://{config['admin']['listen']}"
    st = Path(sys.executable).with_name("st")
    result = subprocess.run(
        [
            str(st),
            "run",
            f"{base}/api/openapi.json",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            # An endless Server-Sent Events stream: the page test reads it instead.
            "--exclude-path",
            "/api/stream",
            "--checks",
            "all",
            # A posted config is a TOML string: which strings are valid configs is beyond a
            # JSON schema, so "schema-valid input accepted" cannot hold for POST /api/reload;
            # its refusals are tested by key path in test_admin_api.
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--max-time",
            str(MAX_SECONDS),
            "--seed",
            "12",
            # Portico binds its traffic listeners first: the admin one follows within moments.
            "--wait-for-schema",
            "10",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=MAX_SECONDS + 120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "17 selected" in result.stdout
