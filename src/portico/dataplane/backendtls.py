"""Client SSL contexts for ``https://`` backends, one per distinct ``TlsTarget``.

Verification is on by default (the system store, or the configured CA file), with the name
checked against the target's ``server_name``; a failure becomes ``ConnectFailed`` with
OpenSSL's reason, which the proxy answers with 502 and logs. Contexts are cached: building one
reads the CA file, which must not happen per connection. A reload that names a different file
gets a new target, hence a new context; a CA file replaced in place needs a restart.
"""

from __future__ import annotations

import ssl

from portico.runtime.tlstarget import TlsTarget

_contexts: dict[TlsTarget, ssl.SSLContext] = {}


def client_context(target: TlsTarget) -> ssl.SSLContext:
    ctx = _contexts.get(target)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=target.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not target.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if target.cert and target.key:
            ctx.load_cert_chain(target.cert, target.key)
        ctx.set_alpn_protocols(["http/1.1"])
        _contexts[target] = ctx
    return ctx


def tls_reason(exc: OSError) -> str:
    """A short reason for a failed TLS connect, for the log and the error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return exc.strerror or type(exc).__name__
