"""The TLS configuration graded by sslyze against Mozilla's profiles (5.7), and session
resumption shared by the workers.

sslyze connects to a real Portico TLS listener with its own (nassl) OpenSSL, including the
legacy one that still speaks SSL 2/3 and TLS 1.0/1.1, so "refused" here means refused on
the wire. The one check left out is certificate path validation: the test CA (trustme) is not
in sslyze's public trust stores, by design of a test.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.backends import RawBackend, echo_http
from tests.support.ports import free_port
from tests.support.proxy import PorticoProcess
from tests.support.tlscerts import CertFiles, client_context
from tests.support.waiting import port_accepts, wait_until

sslyze = pytest.importorskip("sslyze", reason="sslyze (PyPI) grades the TLS configuration")
from sslyze.mozilla_tls_profile.tls_config_checker import (  # noqa: E402
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

# The test CA is not publicly trusted; everything else must pass.
EXPECTED_ISSUES = {"certificate_path_validation"}


def _serve(tmp: Path, profile: str, workers: int = 1) -> tuple[dict[str, Any], int, trustme.CA]:
    ca = trustme.CA()
    now = dt.datetime.now(dt.UTC)
    # Mozilla: at most 366 days of lifetime (intermediate), 90 (modern).
    cert = CertFiles.write(
        ca, tmp, "site", "site.test",
        not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=80),
    )
    port = free_port()
    config = {
        "server": {"shutdown_grace": 1, "workers": workers},
        "tls": [{"listen": [f"127.0.0.1:{port}"], "certs": [cert.entry()], "profile": profile}],
        "upstreams": {"echo": {"backends": ["http://127.0.0.1:9"]}},
    }
    return config, port, ca


def _scan(port: int) -> Any:
    request = sslyze.ServerScanRequest(
        server_location=sslyze.ServerNetworkLocation("site.test", port, ip_address="127.0.0.1"),
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    )
    scanner = sslyze.Scanner()
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    return result


@pytest.fixture(params=["intermediate", "modern"])
def graded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    config, port, _ = _serve(tmp_path, request.param)
    with PorticoProcess(config) as _proc:
        wait_until(lambda: port_accepts(port), 15, message="TLS port")
        yield request.param, _scan(port)


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_sslyze_grades_the_profile(graded: tuple[str, Any]) -> None:
    profile, result = graded
    scan = result.scan_result
    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        accepted = getattr(scan, f"{old}_cipher_suites").result.accepted_cipher_suites
        assert accepted == [], old
    tls12 = scan.tls_1_2_cipher_suites.result.accepted_cipher_suites
    if profile == "modern":
        assert tls12 == []
    else:
        names = {s.cipher_suite.openssl_name for s in tls12}
        assert names and all(n.startswith("ECDHE-") for n in names), names
        assert not any(w in n for n in names for w in ("CBC", "SHA1", "RC4", "3DES", "NULL"))
    assert scan.tls_compression.result.supports_compression is False
    mozilla = MozillaTlsConfiguration.get(TlsConfigurationEnum(profile))
    try:
        check_server_against_tls_configuration(result, mozilla)
        issues: set[str] = set()
    except ServerNotCompliantWithTlsConfiguration as exc:
        issues = set(exc.issues)
        detail = exc.issues
    else:
        detail = {}
    assert issues <= EXPECTED_ISSUES, detail


def test_sessions_resume_on_every_worker(tmp_path: Path) -> None:
    config, port, ca = _serve(tmp_path, "intermediate", workers=2)
    with RawBackend(echo_http()) as backend:
        config["upstreams"]["echo"]["backends"] = [backend.url]
        with PorticoProcess(config) as proc:
            wait_until(lambda: port_accepts(port), 15, message="TLS port")
            ctx = client_context(ca)
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # a session right after the handshake
            session = None
            reused = 0
            attempts = 40
            for _ in range(attempts):
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                    ctx.wrap_socket(raw, server_hostname="site.test", session=session) as tls,
                ):
                    reused += tls.session_reused
                    session = session or tls.session
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
                    while tls.recv(65536):
                        pass
            # The first connection made the session; every later one resumed it, whichever of
            # the two workers the kernel handed it to (with a ticket key per worker, about
            # half fail: measured 24 of 39 resumed).
            assert reused == attempts - 1, proc.output()
