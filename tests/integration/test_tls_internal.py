"""The internal issuer (like Caddy's ``tls internal``): Portico makes its own CA, issues a
certificate for localhost and chosen names, says how to trust the CA; and the status every
automatic certificate keeps for the admin API."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from typing import Any

from portico.config.load import validate
from portico.control.acme import CertManager, prepare
from tests.conftest import PorticoFactory
from tests.support.admin import AdminClient, with_admin
from tests.support.backends import RawBackend, echo_http
from tests.support.ports import free_port
from tests.support.tlscerts import fetch, served_names
from tests.support.waiting import port_accepts, wait_until


def _config(tmp: Path, port: int, backend: str, workers: int = 1) -> dict[str, Any]:
    return {
        "server": {"listen": [], "shutdown_grace": 1, "workers": workers},
        "tls": [{
            "listen": [f"127.0.0.1:{port}"],
            "reload_check": 0.5,
            "auto": {"names": ["localhost", "app.test"], "issuer": "internal",
                     "state_dir": str(tmp / "state")},
        }],
        "upstreams": {"echo": {"backends": [backend]}},
    }


def test_internal_ca_issues_for_localhost(portico: PorticoFactory, tmp_path: Path) -> None:
    port = free_port()
    with RawBackend(echo_http()) as backend:
        config = with_admin(_config(tmp_path, port, backend.url, workers=2))
        proc = portico({**config, "server": {**config["server"], "listen": []}})
        wait_until(lambda: port_accepts(port), 15, message="TLS port")
        ca = tmp_path / "state" / "internal" / "ca.pem"

        def verified() -> bytes | None:
            try:
                return fetch(port, "localhost", ssl.create_default_context(cafile=str(ca))).cert_der
            except (ssl.SSLError, OSError):
                return None

        der = wait_until(verified, 15, message="a certificate from the internal CA")
        assert served_names(der) == ["localhost", "app.test"]
        assert f"--cacert {ca}" in proc.output()  # how to trust it
        assert "update-ca-certificates" in proc.output()
        # The admin API shows each automatic certificate's status (the master orders them).
        certs = AdminClient(config).json("/api/status")["providers"]["certificates"]
        assert certs["tls[0]"]["state"] == "valid", certs
        assert certs["tls[0]"]["names"] == ["localhost", "app.test"]
        # ...and its expiry as a metric (the internal CA issues for 7 days).
        metrics = AdminClient(config).get("/metrics").text
        line = next(
            x for x in metrics.splitlines()
            if x.startswith("portico_tls_certificate_expiry_timestamp_seconds{")
        )  # fmt: skip
        assert 'listener="tls[0]"' in line and 'source="auto"' in line, line
        assert 6 * 86400 < float(line.rsplit(" ", 1)[1]) - time.time() <= 7 * 86400 + 60, line


def test_status_of_an_automatic_certificate(tmp_path: Path) -> None:
    config = validate(_config(tmp_path, free_port(), "http://127.0.0.1:9"))
    prepare(config)
    sent: list[tuple[Any, ...]] = []

    async def run() -> dict[str, Any]:
        manager = CertManager(config, sent.append, wait_listening=0)
        assert manager.status()["tls[0]"]["state"] == "pending"
        manager.start()
        try:
            for _ in range(200):
                if manager.status()["tls[0]"]["state"] == "valid":
                    break
                await asyncio.sleep(0.02)
            return manager.status()["tls[0]"]
        finally:
            manager.stop()

    status = asyncio.run(run())
    assert status["state"] == "valid"
    assert status["names"] == ["localhost", "app.test"]
    assert status["issuer"] == "internal"
    assert status["last_error"] is None and status["failures"] == 0
    assert status["not_after"] and status["last_success"]
    assert ("acme", "reload", "tls[0]", None) in sent  # serving processes are told
