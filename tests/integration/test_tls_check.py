"""``portico check`` and ``portico serve`` on TLS configs: every certificate problem printed
under its key path; an expiring certificate is a warning with its date; ``portico proxy
--tls-cert/--tls-key`` serves HTTPS."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization

from tests.integration.test_cli import portico_cmd
from tests.support.backends import RawBackend, echo_http
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess
from tests.support.tlscerts import CertFiles, client_context, fetch
from tests.support.waiting import port_accepts, wait_until


def _config(tmp: Path, certs: list[dict[str, str]], extra: str = "") -> Path:
    entries = ", ".join(
        "{" + ", ".join(f'{k} = {json.dumps(v)}' for k, v in c.items()) + "}" for c in certs
    )
    text = f"""{extra}
[[tls]]
listen = "127.0.0.1:{free_port()}"
certs = [{entries}]

[upstreams.app]
backends = ["http://127.0.0.1:9"]
"""
    path = tmp / "portico.toml"
    path.write_text(text)
    return path


def test_check_reports_each_certificate_problem_with_its_key_path(tmp_path: Path) -> None:
    ca = trustme.CA()
    inter = ca.create_child_ca()
    good = CertFiles.write(ca, tmp_path, "good", "good.test")
    other = CertFiles.write(ca, tmp_path, "other", "good.test")
    now = dt.datetime.now(dt.UTC)
    expired = CertFiles.write(ca, tmp_path, "expired", "old.test",
                              not_before=now - dt.timedelta(days=30),
                              not_after=now - dt.timedelta(days=1))
    future = CertFiles.write(ca, tmp_path, "future", "new.test",
                             not_before=now + dt.timedelta(days=1),
                             not_after=now + dt.timedelta(days=90))
    chained = CertFiles.write(inter, tmp_path, "chained", "chain.test")
    pems = chained.cert.read_bytes().split(b"-----END CERTIFICATE-----\n")
    chained.cert.write_bytes(pems[1] + b"-----END CERTIFICATE-----\n" + pems[0]
                             + b"-----END CERTIFICATE-----\n")
    key = serialization.load_pem_private_key(good.key.read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"right")))
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("wrong\n")
    path = _config(tmp_path, [
        good.entry(),
        {"cert": str(tmp_path / "missing.pem"), "key": str(good.key)},
        {"cert": str(good.cert), "key": str(other.key)},
        expired.entry(),
        future.entry(),
        chained.entry(),
        {"cert": str(good.cert), "key": str(locked), "password_file": str(wrong)},
        {"cert": str(good.cert), "key": str(locked), "password_env": "PORTICO_TEST_UNSET"},
    ], extra='https_redirect = true\n[[routes]]\nhost = "nocert.test"\nupstream = "app"\n')
    result = portico_cmd("check", path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    expected = [
        f"tls[0].certs[1].cert: cannot read {tmp_path / 'missing.pem'}: No such file or directory",
        "tls[0].certs[2].key: the key does not match the certificate",
        "tls[0].certs[3].cert: expired on ",
        "tls[0].certs[4].cert: not valid before ",
        "tls[0].certs[5].cert: chain in the wrong order",
        "tls[0].certs[6].key: wrong password for the key",
        "tls[0].certs[7].password_env: PORTICO_TEST_UNSET is not set",
        "routes[0].host: no certificate of any tls listener covers nocert.test",
    ]
    for want in expected:
        assert any(line.startswith(want) for line in lines), (want, lines)


def test_check_warns_of_a_certificate_expiring_soon(tmp_path: Path) -> None:
    ca = trustme.CA()
    now = dt.datetime.now(dt.UTC)
    end = now + dt.timedelta(days=5)
    soon = CertFiles.write(ca, tmp_path, "soon", "soon.test", not_after=end)
    result = portico_cmd("check", _config(tmp_path, [soon.entry()]))
    assert result.returncode == 0, result.stdout
    assert f"warning: tls[0].certs[0].cert: expires on {end:%Y-%m-%d %H:%M} UTC" in result.stderr


def test_serve_refuses_a_broken_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    good = CertFiles.write(ca, tmp_path, "good", "good.test")
    other = CertFiles.write(ca, tmp_path, "other", "good.test")
    path = _config(tmp_path, [{"cert": str(good.cert), "key": str(other.key)}])
    result = portico_cmd("serve", "-c", path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "tls[0].certs[0].key: the key does not match the certificate" in output


def test_proxy_with_tls_flags_serves_https_by_sni(tmp_path: Path) -> None:
    ca = trustme.CA()
    one = CertFiles.write(ca, tmp_path, "one", "one.test")
    two = CertFiles.write(ca, tmp_path, "two", "two.test")
    port = free_port()
    with RawBackend(echo_http()) as backend:
        argv = [sys.executable, "-m", "portico", "proxy", "--listen", f"127.0.0.1:{port}",
                "--backend", backend.url,
                "--tls-cert", str(one.cert), "--tls-key", str(one.key),
                "--tls-cert", str(two.cert), "--tls-key", str(two.key)]
        with ManagedProcess(argv, name="portico proxy") as proc:
            wait_until(lambda: proc.alive() and port_accepts(port), 15, message="https port")
            ctx = client_context(ca)
            for name in ("one.test", "two.test"):
                got = fetch(port, name, ctx)  # the name is verified by the client
                assert got.status == 200
                headers = {k.lower(): v for k, v in json.loads(got.body)["headers"]}
                assert headers["x-forwarded-proto"] == "https"
    assert os.path.exists(one.cert)
