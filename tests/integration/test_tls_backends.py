"""TLS to ``https://`` backends: verified against a CA file by default (a failure is a 502
with the reason in the log), SNI and Host set to the backend's name, an optional client
certificate, and health checks over TLS.

The HTTPS backend is a real TLS server: a second Portico terminating TLS in front of
``echo_http``, so the test sees the exact head that crossed both hops.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import PorticoFactory
from tests.support.backends import RawBackend, echo_http
from tests.support.ports import free_port
from tests.support.proxy import PorticoProcess
from tests.support.tlscerts import CertFiles
from tests.support.waiting import port_accepts, wait_until


class HttpsBackend:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.client_ca = trustme.CA()
        self.ca_file = tmp / "backend-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        client_ca_file = tmp / "client-ca.pem"
        self.client_ca.cert_pem.write_to_path(str(client_ca_file))
        self.server = CertFiles.write(self.ca, tmp, "backend", "backend.test")
        self.client = CertFiles.write(self.client_ca, tmp, "client", "portico.test")
        self.port, self.mtls_port = free_port(), free_port()
        self.echo = RawBackend(echo_http())
        self.config = {
            "server": {"listen": [], "shutdown_grace": 1},
            "tls": [
                {"listen": [f"127.0.0.1:{self.port}"], "certs": [self.server.entry()]},
                {
                    "listen": [f"127.0.0.1:{self.mtls_port}"],
                    "certs": [self.server.entry()],
                    "client_auth": {"ca": str(client_ca_file)},
                },
            ],
            "upstreams": {"echo": {"backends": [self.echo.url]}},
        }


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsBackend]:
    b = HttpsBackend(tmp_path_factory.mktemp("tlsbackend"))
    with b.echo, _started(b.config):
        for port in (b.port, b.mtls_port):
            wait_until(lambda p=port: port_accepts(p), 15, message=f"backend TLS port {port}")
        yield b


class _started:
    """PorticoProcess with no plain listener: started and waited on by the fixture."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.proc = PorticoProcess({**config, "server": {**config["server"], "listen": []}})

    def __enter__(self) -> PorticoProcess:
        self.proc.addresses = []  # nothing plain to wait on; the TLS ports are waited on
        return self.proc.start()

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()


def _get(proxy: PorticoProcess, upstream_host: str = "front.test") -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", "/path?q=1", headers={"Host": upstream_host})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(body) if resp.status == 200 else {}


def _front(b: HttpsBackend, port: int, tls: dict[str, Any] | None, **up: Any) -> dict[str, Any]:
    upstream: dict[str, Any] = {"backends": [f"https://127.0.0.1:{port}"], **up}
    if tls is not None:
        upstream["tls"] = tls
    return {"server": {"shutdown_grace": 1}, "upstreams": {"b": upstream}}


def test_verified_backend_gets_sni_and_host(portico: PorticoFactory, backend: HttpsBackend) -> None:
    proxy = portico(_front(backend, backend.port,
                           {"ca": str(backend.ca_file), "server_name": "backend.test"}))
    status, echoed = _get(proxy)
    assert status == 200
    headers = {k.lower(): v for k, v in echoed["headers"]}
    assert headers["host"] == "backend.test"  # the name TLS verified, not the client's
    assert echoed["target"] == "/path?q=1"


def test_verification_failure_is_a_502_with_the_reason_logged(
    portico: PorticoFactory, backend: HttpsBackend
) -> None:
    # No CA given: the system store does not know trustme's CA.
    proxy = portico(_front(backend, backend.port, {"server_name": "backend.test"},
                           retry={"attempts": 1}))
    assert _get(proxy)[0] == 502
    wait_until(lambda: "TLS certificate verification failed" in proxy.output(), 5,
               message="the reason in the log")
    # The right CA but the wrong name: refused too.
    wrong = portico(_front(backend, backend.port,
                           {"ca": str(backend.ca_file), "server_name": "other.test"},
                           retry={"attempts": 1}))
    assert _get(wrong)[0] == 502
    wait_until(lambda: "Hostname mismatch" in wrong.output(), 5, message="mismatch logged")
    # verify = false: accepted (for backends with self-made certificates).
    lax = portico(_front(backend, backend.port, {"verify": False}))
    assert _get(lax)[0] == 200


def test_client_certificate_to_an_mtls_backend(
    portico: PorticoFactory, backend: HttpsBackend
) -> None:
    base = {"ca": str(backend.ca_file), "server_name": "backend.test"}
    without = portico(_front(backend, backend.mtls_port, base, retry={"attempts": 1}))
    assert _get(without)[0] == 502
    tls = {**base, "cert": str(backend.client.cert), "key": str(backend.client.key)}
    proxy = portico(_front(backend, backend.mtls_port, tls))
    status, echoed = _get(proxy)
    assert status == 200
    headers = {k.lower(): v for k, v in echoed["headers"]}
    # The backend verified Portico's certificate and described it.
    assert "trustme" in headers["x-client-cert-subject"]
    assert len(headers["x-client-cert-fingerprint"]) == 64


def test_health_checks_speak_tls(portico: PorticoFactory, backend: HttpsBackend) -> None:
    checks = {"path": "/", "interval": 0.2, "timeout": 1, "rise": 1, "fall": 1}
    good = portico(_front(backend, backend.port,
                          {"ca": str(backend.ca_file), "server_name": "backend.test"},
                          health=checks))
    bad = portico(_front(backend, backend.port, {"server_name": "backend.test"},
                         health=checks))
    wait_until(lambda: "TLS certificate verification failed" in bad.output(), 5,
               message="the failing check's reason")
    assert "down" in bad.output().lower()
    assert _get(good)[0] == 200
    assert "TLS certificate verification failed" not in good.output()
