"""Pebble, Let's Encrypt's test ACME server (Debian package ``pebble``), with its companion
``pebble-challtestsrv`` as the DNS server that points every name at 127.0.0.1.

``Pebble(http_port, tls_port)`` validates HTTP-01 challenges on ``http_port`` and TLS-ALPN-01
on ``tls_port`` of 127.0.0.1 (where the Portico under test listens). Its own HTTPS uses a
trustme certificate; ``ca_file`` is the CA to trust for the directory. Pebble makes a new
root for every run: ``roots_pem()`` fetches it from the management interface, to verify
what it issued. ``set_address(name, ip)`` makes one name resolve elsewhere (a challenge that
must fail).
"""

from __future__ import annotations

import json
import shutil
import ssl
import tempfile
import urllib.request
from pathlib import Path
from typing import Self

import trustme

from tests.support.lifecycle import StartStop
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess
from tests.support.waiting import port_accepts, wait_until


def available() -> bool:
    return shutil.which("pebble") is not None and shutil.which("pebble-challtestsrv") is not None


class Pebble(StartStop):
    def __init__(self, http_port: int, tls_port: int, validity: int | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="pebble-"))
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(self._dir / "cert.pem"))
        cert.private_key_pem.write_to_path(str(self._dir / "key.pem"))
        self.ca_file = self._dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.port, self.mgmt_port = free_port(), free_port()
        self.dns_port, self.dns_mgmt_port = free_port(), free_port()
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
            "certificate": str(self._dir / "cert.pem"),
            "privateKey": str(self._dir / "key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if validity is not None:
            config["certificateValidityPeriod"] = validity
        (self._dir / "pebble.json").write_text(json.dumps({"pebble": config}))
        self.dns = ManagedProcess(
            ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
             "-dns01", f"127.0.0.1:{self.dns_port}", "-management",
             f"127.0.0.1:{self.dns_mgmt_port}", "-http01", "", "-https01", "", "-tlsalpn01", ""],
            name="challtestsrv",
        )
        # No sleep before validating, every nonce accepted: fast and deterministic runs.
        env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        self.server = ManagedProcess(
            ["pebble", "-config", str(self._dir / "pebble.json"), "-dnsserver",
             f"127.0.0.1:{self.dns_port}"],
            env=env,
            name="pebble",
        )

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> Self:
        self.dns.start()
        wait_until(lambda: port_accepts(self.dns_mgmt_port), 15, message="challtestsrv")
        self.server.start()
        wait_until(lambda: port_accepts(self.port) and port_accepts(self.mgmt_port), 15,
                   message="pebble")
        return self

    def stop(self) -> None:
        self.server.stop()
        self.dns.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def output(self) -> str:
        return self.server.output()

    def _mgmt(self, path: str) -> bytes:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # Pebble's management port uses the same test cert
        with urllib.request.urlopen(f"https://127.0.0.1:{self.mgmt_port}{path}", context=ctx,
                                    timeout=10) as resp:
            return bytes(resp.read())

    def roots_pem(self) -> bytes:
        return self._mgmt("/roots/0")

    def set_address(self, name: str, ip: str) -> None:
        body = json.dumps({"host": name, "addresses": [ip]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.dns_mgmt_port}/add-a", data=body)
        with urllib.request.urlopen(req, timeout=10):
            pass
