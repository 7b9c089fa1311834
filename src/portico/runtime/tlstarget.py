"""How to speak TLS to one backend: pure data, compiled from ``upstreams.NAME.tls`` for each
``https://`` backend and kept on its ``Endpoint``. ``dataplane.backendtls`` turns it into an
SSLContext (once per distinct target) when a connection is opened."""

from __future__ import annotations

from dataclasses import dataclass

from portico.config.model import Backend, Upstream
from portico.config.tls import BackendTls


@dataclass(frozen=True, slots=True)
class TlsTarget:
    server_name: str  # SNI and the name the certificate must carry
    verify: bool
    ca: str | None  # None: the system store
    cert: str | None
    key: str | None


def tls_target(up: Upstream, backend: Backend) -> TlsTarget | None:
    """The target of ``backend``, or None for a plain ``http://`` one."""
    if not backend.is_https:
        return None
    t = up.tls or BackendTls()
    return TlsTarget(t.server_name or backend.address[0], t.verify, t.ca, t.cert, t.key)


def https_host(up: Upstream) -> bytes | None:
    """The Host sent to https backends when ``host`` is unset: the name TLS verifies (a
    virtual-hosted HTTPS server routes by it, and it must agree with SNI)."""
    if up.host:
        return None
    for backend in up.backends:
        if backend.is_https:
            name = (up.tls.server_name if up.tls else None) or backend.address[0]
            return name.encode("idna")
    return None
