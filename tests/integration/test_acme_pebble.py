"""ACME end to end against Pebble: first issuance (HTTP-01 and TLS-ALPN-01), renewal of
short-lived certificates while serving, a challenge that fails (its reason kept, back-off,
the other certificate unaffected), and workers > 1 (issued once, served by every worker).

Pebble validates by connecting to 127.0.0.1 on the ports Portico listens on; its DNS
(pebble-challtestsrv) answers 127.0.0.1 for every name. Skipped when the Debian package
``pebble`` is not installed (scripts/test.sh installs it).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PorticoFactory
from tests.support import pebble
from tests.support.backends import RawBackend, echo_http
from tests.support.pebble import Pebble
from tests.support.ports import free_port
from tests.support.tlscerts import fetch, served_names
from tests.support.waiting import port_accepts, wait_until

pytestmark = pytest.mark.skipif(
    not pebble.available(), reason="pebble is not installed (apt-get install pebble)"
)


@pytest.fixture
def echo() -> Iterator[RawBackend]:
    with RawBackend(echo_http()) as backend:
        yield backend


def _config(plain: int, tls_port: int, pb: Pebble, tmp: Path, backend: RawBackend,
            names: list[str], challenge: str = "http-01", **auto: Any) -> dict[str, Any]:
    return {
        "server": {"listen": [f"127.0.0.1:{plain}"], "shutdown_grace": 1},
        "tls": [{
            "listen": [f"127.0.0.1:{tls_port}"],
            "reload_check": 0.5,
            "auto": {
                "names": names,
                "directory": pb.directory,
                "directory_ca": str(pb.ca_file),
                "challenge": challenge,
                "state_dir": str(tmp / "state"),
                "retry_min": 1,
                "retry_max": 2,
                **auto,
            },
        }],
        "upstreams": {"echo": {"backends": [backend.url]}},
    }


def _pebble_trust(pb: Pebble) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pb.roots_pem().decode())
    return ctx


def _issued(port: int, name: str, pb: Pebble) -> bytes | None:
    """The served certificate for ``name`` if it verifies against Pebble's root, else None."""
    try:
        return fetch(port, name, _pebble_trust(pb)).cert_der
    except (ssl.SSLError, OSError):
        return None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_first_issuance(portico: PorticoFactory, tmp_path: Path, echo: RawBackend,
                        challenge: str) -> None:
    plain, tls_port = free_port(), free_port()
    with Pebble(plain, tls_port) as pb:
        proc = portico(_config(plain, tls_port, pb, tmp_path, echo,
                               ["site.test", "www.site.test"], challenge))
        wait_until(lambda: port_accepts(tls_port), 15, message="TLS port")
        der = wait_until(lambda: _issued(tls_port, "www.site.test", pb), 60,
                         message="a Pebble certificate served")
        assert served_names(der) == ["site.test", "www.site.test"]
        assert "issued, valid until" in proc.output()
        state = tmp_path / "state" / "acme"
        assert (state / "account.key").exists()
        assert (state / "site.test" / "fullchain.pem").exists()


@pytest.mark.timeout(180)
def test_renewal_of_short_lived_certificates_while_serving(
    portico: PorticoFactory, tmp_path: Path, echo: RawBackend
) -> None:
    plain, tls_port = free_port(), free_port()
    with Pebble(plain, tls_port, validity=12) as pb:  # 12 s: renewal after about 8 s
        proc = portico(_config(plain, tls_port, pb, tmp_path, echo, ["short.test"]))
        wait_until(lambda: port_accepts(tls_port), 15, message="TLS port")
        first = wait_until(lambda: _issued(tls_port, "short.test", pb), 60, message="issued")
        failures = 0
        served: set[bytes] = {first}
        trust = _pebble_trust(pb)
        deadline = time.monotonic() + 60
        # Bounded in count and time: until two renewals were served.
        for _ in range(20000):
            if len(served) >= 3 or time.monotonic() > deadline:
                break
            try:
                served.add(fetch(tls_port, "short.test", trust).cert_der)
            except (ssl.SSLError, OSError):
                failures += 1
        assert len(served) >= 3, proc.output()
        assert failures == 0
        assert proc.output().count("issued, valid until") >= 3


@pytest.mark.timeout(120)
def test_failing_challenge_is_retried_with_back_off_and_reported(
    portico: PorticoFactory, tmp_path: Path, echo: RawBackend
) -> None:
    plain, tls_port = free_port(), free_port()
    with Pebble(plain, tls_port) as pb:
        pb.set_address("fail.test", "127.0.0.2")  # nothing listens there: validation fails
        config = _config(plain, tls_port, pb, tmp_path, echo, ["fail.test"])
        good_port = free_port()
        ok_auto = dict(config["tls"][0]["auto"], names=["ok.test"],
                       state_dir=str(tmp_path / "state2"))
        config["tls"].append({"listen": [f"127.0.0.1:{good_port}"], "auto": ok_auto})
        proc = portico(config)
        wait_until(lambda: proc.output().count("failed (attempt") >= 2, 60,
                   message="two failed attempts")
        out = proc.output()
        assert "fail.test" in out and "127.0.0.2" in out, out  # the CA's reason, in the log
        # Meanwhile the placeholder still serves fail.test, and ok.test got its certificate.
        assert fetch(tls_port, None, _unverified()).status == 200
        wait_until(lambda: _issued(good_port, "ok.test", pb), 60, message="ok.test issued")


def _unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.mark.timeout(120)
def test_workers_share_one_issuance(
    portico: PorticoFactory, tmp_path: Path, echo: RawBackend
) -> None:
    plain, tls_port = free_port(), free_port()
    with Pebble(plain, tls_port) as pb:
        proc = portico(_config(plain, tls_port, pb, tmp_path, echo, ["multi.test"]), workers=3)
        wait_until(lambda: port_accepts(tls_port), 15, message="TLS port")
        wait_until(lambda: _issued(tls_port, "multi.test", pb), 60, message="issued")
        # Every new connection, whichever worker takes it, gets the issued certificate.
        for _ in range(30):
            assert _issued(tls_port, "multi.test", pb) is not None
        assert proc.output().count("requesting a certificate") == 1  # once, in the master
        with socket.create_connection(("127.0.0.1", plain), timeout=5):
            pass
