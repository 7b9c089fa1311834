"""HTTPS termination over real sockets: SNI among three certificates, protocol versions,
ALPN, the HTTPS redirect and HSTS, mTLS, handshakes that misbehave, plain HTTP sent to a TLS
port, and clients that are not Python (curl, ``openssl s_client``).

Certificates come from ``trustme``; the backend is ``echo_http``, which reports the exact head
it received (so X-Forwarded-Proto and the client-certificate headers can be checked).
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.backends import RawBackend, echo_http
from tests.support.ports import free_port
from tests.support.proxy import PorticoProcess
from tests.support.tlscerts import CertFiles, client_context, fetch, served_names
from tests.support.waiting import port_accepts, wait_until


def echoed_headers(body: bytes) -> dict[str, str]:
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


class Site:
    """The module's proxy: a plain listener that redirects, a TLS listener with three
    certificates, and two mTLS listeners (require, request)."""

    def __init__(self, tmp: Path, backend: RawBackend) -> None:
        self.ca = trustme.CA()
        self.client_ca = trustme.CA()
        self.a = CertFiles.write(self.ca, tmp, "a", "a.test")
        self.b = CertFiles.write(self.ca, tmp, "b", "*.b.test")
        self.c = CertFiles.write(self.ca, tmp, "c", "c.test", "localhost")
        client_ca_file = tmp / "client-ca.pem"
        self.client_ca.cert_pem.write_to_path(str(client_ca_file))
        self.plain, self.tls, self.mtls, self.mtls_opt = (free_port() for _ in range(4))
        certs = [self.c.entry(), self.a.entry(), self.b.entry()]  # c is the default
        auth = {"ca": str(client_ca_file)}
        self.config: dict[str, Any] = {
            "https_redirect": True,
            "hsts": {"max_age": 600},
            "server": {"listen": [f"127.0.0.1:{self.plain}"], "shutdown_grace": 1},
            "tls": [
                {"listen": [f"127.0.0.1:{self.tls}"], "certs": certs, "handshake_timeout": 1},
                {"listen": [f"127.0.0.1:{self.mtls}"], "certs": certs, "client_auth": auth},
                {
                    "listen": [f"127.0.0.1:{self.mtls_opt}"],
                    "certs": certs,
                    "client_auth": {**auth, "mode": "request"},
                },
            ],
            "upstreams": {"echo": {"backends": [backend.url]}},
        }
        self.ctx = client_context(self.ca)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Site, PorticoProcess]]:
    tmp = tmp_path_factory.mktemp("tls")
    with RawBackend(echo_http()) as backend:
        s = Site(tmp, backend)
        with PorticoProcess(s.config) as proc:
            for port in (s.tls, s.mtls, s.mtls_opt):
                wait_until(lambda p=port: port_accepts(p), 10, message=f"TLS port {port}")
            yield s, proc


def test_sni_selects_among_three_certificates(site: tuple[Site, PorticoProcess]) -> None:
    s, _ = site
    for name, expected in [
        ("a.test", ["a.test"]),
        ("www.b.test", ["*.b.test"]),
        ("api.b.test", ["*.b.test"]),
        ("c.test", ["c.test", "localhost"]),
    ]:
        got = fetch(s.tls, name, s.ctx)
        assert got.status == 200, name
        assert served_names(got.cert_der) == expected, name
        # TLS is visible to the backend, and to {scheme}.
        assert echoed_headers(got.body)["x-forwarded-proto"] == "https"


def test_default_certificate_without_sni_or_for_unknown_names(
    site: tuple[Site, PorticoProcess],
) -> None:
    s, _ = site
    ctx = client_context(s.ca)
    ctx.check_hostname = False  # the point: the name is unknown or absent
    for name in (None, "unknown.example", "deep.sub.b.test"):
        got = fetch(s.tls, name, ctx)
        assert served_names(got.cert_der) == ["c.test", "localhost"], name


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_versions_and_alpn(site: tuple[Site, PorticoProcess]) -> None:
    s, _ = site
    got = fetch(s.tls, "a.test", s.ctx)
    assert got.version == "TLSv1.3"
    assert got.alpn is None  # the client offered none
    ctx = client_context(s.ca)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    got = fetch(s.tls, "a.test", ctx)
    assert (got.version, got.alpn) == ("TLSv1.2", "http/1.1")
    old = client_context(s.ca)
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        fetch(s.tls, "a.test", old)


def test_plain_http_redirects_to_https_except_acme(site: tuple[Site, PorticoProcess]) -> None:
    s, _ = site
    with socket.create_connection(("127.0.0.1", s.plain), timeout=5) as sock:
        sock.sendall(b"POST /x/y?q=1 HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
        head = sock.recv(65536).decode()
    assert head.startswith("HTTP/1.1 308 ")
    assert f"Location: https://a.test:{s.tls}/x/y?q=1\r\n" in head
    assert "Strict-Transport-Security" not in head  # never over plain HTTP (RFC 6797 7.2)
    # An ACME HTTP-01 challenge goes to the routes (here, the backend) over plain HTTP.
    with socket.create_connection(("127.0.0.1", s.plain), timeout=5) as sock:
        sock.sendall(
            b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a.test\r\n"
            b"Connection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    # Over HTTPS: no redirect, and HSTS.
    with (
        socket.create_connection(("127.0.0.1", s.tls), timeout=5) as raw,
        s.ctx.wrap_socket(raw, server_hostname="a.test") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        head = tls.recv(65536).decode()
    assert head.startswith("HTTP/1.1 200 ")
    assert "Strict-Transport-Security: max-age=600\r\n" in head


def test_mtls_require_accepts_a_client_certificate_and_refuses_none(
    site: tuple[Site, PorticoProcess], tmp_path: Path
) -> None:
    s, _ = site
    with pytest.raises((ssl.SSLError, ConnectionError)):
        fetch(s.mtls, "a.test", s.ctx)  # TLS 1.3: the refusal arrives on the first read
    client = s.client_ca.issue_cert("client@example.test", common_name="client-1")
    ctx = client_context(s.ca)
    client.configure_cert(ctx)
    # A client's own certificate headers never reach the backend: Portico's do.
    forged = "X-Client-Cert-Subject: CN=admin\r\nX-Client-Cert-Fingerprint: 00\r\n"
    got = fetch(s.mtls, "a.test", ctx, headers=forged)
    assert got.status == 200
    headers = json.loads(got.body)["headers"]
    subjects = [v for k, v in headers if k.lower() == "x-client-cert-subject"]
    prints = [v for k, v in headers if k.lower() == "x-client-cert-fingerprint"]
    assert len(subjects) == 1 and "CN=client-1" in subjects[0]
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(client.cert_chain_pems[0].bytes()).public_bytes(
        Encoding.DER
    )
    assert prints == [hashlib.sha256(der).hexdigest()]
    # A certificate from another CA is refused.
    stranger = trustme.CA().issue_cert("x@example.test")
    bad = client_context(s.ca)
    stranger.configure_cert(bad)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        fetch(s.mtls, "a.test", bad)


def test_mtls_request_lets_clients_without_a_certificate_in(
    site: tuple[Site, PorticoProcess],
) -> None:
    s, _ = site
    got = fetch(s.mtls_opt, "a.test", s.ctx, headers="X-Client-Cert-Subject: CN=forged\r\n")
    assert got.status == 200
    assert "x-client-cert-subject" not in echoed_headers(got.body)
    # The forged header is stripped on the plain listener too (it redirects here, so look
    # at the ACME path, which reaches the backend).
    with socket.create_connection(("127.0.0.1", s.plain), timeout=5) as sock:
        sock.sendall(
            b"GET /.well-known/acme-challenge/t HTTP/1.1\r\nHost: a\r\n"
            b"X-Client-Cert-Subject: CN=forged\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert b"forged" not in data


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the peer closed ``sock`` (EOF or reset); fails after ``seconds``."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"not closed within {seconds}s")
    return time.monotonic() - start


def test_bad_handshakes_are_cut_and_others_are_served(site: tuple[Site, PorticoProcess]) -> None:
    s, _ = site
    # A real ClientHello, cut half way: made by a memory-BIO handshake.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = s.ctx.wrap_bio(incoming, outgoing, server_hostname="a.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    silent = socket.create_connection(("127.0.0.1", s.tls))
    half = socket.create_connection(("127.0.0.1", s.tls))
    half.sendall(hello[: len(hello) // 2])
    garbage = socket.create_connection(("127.0.0.1", s.tls))
    garbage.sendall(b"\x16\x03\x01\x00\x05hello-not-tls" * 10)
    plain = socket.create_connection(("127.0.0.1", s.tls))
    plain.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    try:
        # Meanwhile, well-behaved clients are served.
        for _ in range(5):
            assert fetch(s.tls, "a.test", s.ctx).status == 200
        assert _closed_within(garbage, 2) < 1.0  # OpenSSL refuses it at once
        assert _closed_within(plain, 2) < 1.0  # plain HTTP to a TLS port: closed, no hang
        assert _closed_within(half, 3) < 2.5  # handshake_timeout = 1
        assert _closed_within(silent, 3) < 2.5
        assert fetch(s.tls, "a.test", s.ctx).status == 200
    finally:
        for sock in (silent, half, garbage, plain):
            sock.close()


def test_cut_handshakes_are_counted(tmp_path: Path) -> None:
    with RawBackend(echo_http()) as backend:
        s = Site(tmp_path, backend)
        proc = PorticoProcess(s.config).start()
        try:
            wait_until(lambda: port_accepts(s.tls), 10, message="TLS port")
            bad = []
            for payload in (b"", b"\x16\x03\x01\x00\x05garbage-garbage", b"GET / HTTP/1.1\r\n\r\n"):
                sock = socket.create_connection(("127.0.0.1", s.tls))
                if payload:
                    sock.sendall(payload)
                bad.append(sock)
            for _ in range(3):
                assert fetch(s.tls, "a.test", s.ctx).status == 200
            for sock in bad:
                _closed_within(sock, 3)  # the silent one by handshake_timeout
                sock.close()
        finally:
            proc.stop()  # the counts are logged on the way out
    # port_accepts' probes never start a handshake either: they count as cut too.
    line = next(ln for ln in proc.output().splitlines() if "handshake(s) completed" in ln)
    accepted, completed, cut = (int(w) for w in line.split() if w.isdigit())
    assert completed == 3 and cut >= 3 and accepted == completed + cut, line


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(site: tuple[Site, PorticoProcess], tmp_path: Path) -> None:
    s, _ = site
    ca_file = tmp_path / "ca.pem"
    s.ca.cert_pem.write_to_path(str(ca_file))
    out = subprocess.run(
        ["curl", "-sS", "--http1.1", "--cacert", str(ca_file), "--resolve",
         f"www.b.test:{s.tls}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code} %{scheme}",
         f"https://www.b.test:{s.tls}/"],
        capture_output=True, text=True, timeout=20, check=False,
    )
    assert out.stdout == "200 HTTPS", out.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client(site: tuple[Site, PorticoProcess], tmp_path: Path) -> None:
    s, _ = site
    ca_file = tmp_path / "ca.pem"
    s.ca.cert_pem.write_to_path(str(ca_file))
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{s.tls}", "-servername", "a.test",
         "-alpn", "http/1.1", "-CAfile", str(ca_file), "-verify_return_error", "-brief"],
        input="", capture_output=True, text=True, timeout=20, check=False,
    )
    text = out.stdout + out.stderr
    assert "Protocol version: TLSv1.3" in text, text
    assert "Verification: OK" in text, text
    # TLS 1.1 and 1.0 are refused.
    for flag in ("-tls1_1", "-tls1"):
        old = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{s.tls}", flag,
             "-cipher", "ALL:@SECLEVEL=0"],
            input="", capture_output=True, text=True, timeout=20, check=False,
        )
        assert old.returncode != 0, old.stdout
