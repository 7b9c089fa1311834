"""Certificates replaced on disk while clients keep connecting: every request succeeds, new
handshakes get the new certificate, a broken replacement is refused and the old one stays;
SIGHUP reloads too; and the same with two workers.
"""

from __future__ import annotations

import os
import signal
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.conftest import PorticoFactory
from tests.support.backends import RawBackend, echo_http
from tests.support.ports import free_port
from tests.support.tlscerts import CertFiles, client_context, fetch
from tests.support.waiting import port_accepts, wait_until

# Bounds of the load loop: requests and seconds, whichever comes first.
MAX_REQUESTS = 3000
MAX_SECONDS = 20.0


def _replace(target: CertFiles, new: CertFiles) -> None:
    """Atomically, key first: a handshake sees old or new files, and a reader that catches
    the new key with the old certificate refuses the pair and tries again on the next change."""
    for src, dst in ((new.key, target.key), (new.cert, target.cert)):
        tmp = dst.with_suffix(".tmp")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)


def _config(tls_port: int, files: CertFiles, backend: RawBackend, check: float) -> dict[str, Any]:
    return {
        "server": {"shutdown_grace": 1},
        "tls": [{"listen": [f"127.0.0.1:{tls_port}"], "certs": [files.entry()],
                 "reload_check": check}],
        "upstreams": {"echo": {"backends": [backend.url]}},
    }


@pytest.mark.parametrize("workers", [1, 2])
def test_replacement_under_load_fails_no_request(
    portico: PorticoFactory, tmp_path: Path, workers: int
) -> None:
    ca = trustme.CA()
    live = CertFiles.write(ca, tmp_path, "live", "site.test")
    with RawBackend(echo_http()) as backend:
        port = free_port()
        proc = portico(_config(port, live, backend, 0.2), workers=workers)
        wait_until(lambda: port_accepts(port), 15, message="TLS port")
        ctx = client_context(ca)
        old_der = fetch(port, "site.test", ctx).cert_der
        failures: list[BaseException] = []
        served: list[bytes] = []
        stop = threading.Event()

        def load() -> None:
            deadline = threading.Event()
            timer = threading.Timer(MAX_SECONDS, deadline.set)
            timer.start()
            try:
                for _ in range(MAX_REQUESTS):
                    if stop.is_set() or deadline.is_set():
                        return
                    try:
                        got = fetch(port, "site.test", ctx)
                        assert got.status == 200
                        served.append(got.cert_der)
                    except BaseException as exc:
                        failures.append(exc)
            finally:
                timer.cancel()

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(served) > 20, 10, message="load running")
            new = CertFiles.write(ca, tmp_path, "new", "site.test")
            good_der = ssl.PEM_cert_to_DER_cert(new.cert.read_text())
            _replace(live, new)
            # Every worker has it: ten new connections in a row get it.
            wait_until(
                lambda: all(fetch(port, "site.test", ctx).cert_der == good_der for _ in range(10)),
                10,
                message="new cert served by every worker",
            )
            # A broken replacement: a key that is not the certificate's.
            other = CertFiles.write(ca, tmp_path, "other", "site.test")
            live.key.write_bytes(other.key.read_bytes())
            refusals = workers  # each process refuses it
            wait_until(lambda: proc.output().count("certificate refused") >= refusals, 10,
                       message="refusal")
            assert "does not match" in proc.output()
            n = len(served)
            wait_until(lambda: len(served) > n + 20, 10, message="still serving")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert failures == []
        assert fetch(port, "site.test", ctx).cert_der == good_der != old_der


def test_sighup_reloads_certificates(portico: PorticoFactory, tmp_path: Path) -> None:
    ca = trustme.CA()
    live = CertFiles.write(ca, tmp_path, "live", "site.test")
    with RawBackend(echo_http()) as backend:
        port = free_port()
        proc = portico(_config(port, live, backend, 0))  # no file watching: SIGHUP only
        wait_until(lambda: port_accepts(port), 15, message="TLS port")
        ctx = client_context(ca)
        before = fetch(port, "site.test", ctx).cert_der
        _replace(live, CertFiles.write(ca, tmp_path, "new", "site.test"))
        assert fetch(port, "site.test", ctx).cert_der == before
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: fetch(port, "site.test", ctx).cert_der != before, 10,
                   message="SIGHUP reload")
