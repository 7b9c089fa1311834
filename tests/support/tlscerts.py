"""Test certificates from ``trustme`` written as PEM files, and TLS client helpers.

``CertFiles.write`` puts a chain (leaf first) and its key where a Portico config can name
them; ``fetch`` does one HTTPS request over a fresh connection with Python's ssl and returns
the status, the body and the served certificate's DER, so a test can tell which certificate
answered.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509


@dataclass
class CertFiles:
    cert: Path
    key: Path

    @classmethod
    def write(
        cls, ca: trustme.CA, directory: Path, stem: str, *names: str, **kw: object
    ) -> CertFiles:
        issued = ca.issue_cert(*names, **kw)  # type: ignore[arg-type]
        files = cls(directory / f"{stem}.pem", directory / f"{stem}.key")
        files.cert.write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
        files.key.write_bytes(issued.private_key_pem.bytes())
        return files

    def entry(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def served_names(der: bytes) -> list[str]:
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return [str(n) for n in san.value.get_values_for_type(x509.DNSName)]


@dataclass
class Fetched:
    status: int
    body: bytes
    cert_der: bytes
    version: str | None
    alpn: str | None


def fetch(
    port: int,
    server_name: str | None,
    ctx: ssl.SSLContext,
    target: str = "/",
    headers: str = "",
    timeout: float = 5.0,
) -> Fetched:
    """One request over a new TLS connection to 127.0.0.1:``port`` (Connection: close)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True) or b""
        host = server_name or "127.0.0.1"
        tls.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
            .encode()
        )
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        if not data:
            raise ConnectionError("closed without a response")
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return Fetched(status, body, der, tls.version(), tls.selected_alpn_protocol())
