"""TLS termination: SSL contexts per certificate, SNI selection, certificate reload, mTLS.

Theory of operation. A TLS listener is served by one *base* SSLContext handed to
``loop.create_server``; its ``sni_callback`` runs inside every handshake (also when the
client sends no name) and switches the connection to the context of the certificate the
``policy.certnames.NameTable`` picks. ``CertStore`` owns the table: reloading builds a
complete new table and swaps it with one assignment, so a handshake sees the old set or the
new one, never half of each, and established connections keep what they negotiated. A
replaced file with any error (unreadable, key mismatch, expired, ...) is refused with the
reason and the running certificates stay. Session tickets are encrypted with the base
context's keys (OpenSSL keeps the session context of the first SSL_CTX), so switching contexts
does not break resumption within a process.

The handshake has its own timeout (``ssl_handshake_timeout``); a client that sends garbage,
stops half way or never speaks is cut by OpenSSL or that timer, before any ``ClientConnection``
exists, so it touches no request state. Plain HTTP sent to a TLS port fails the handshake and
the connection is closed at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from portico.config.tls import CertFile, ClientAuth, TlsListener
from portico.dataplane import openssl
from portico.dataplane.connection import ClientConnection
from portico.dataplane.context import ProxyContext
from portico.policy.certificates import inspect
from portico.policy.certnames import NameTable
from portico.policy.tickets import period, ticket_key
from portico.policy.tlsprofile import TLS12, Profile, profile

log = logging.getLogger("portico.tls")

_VERSIONS = {TLS12: ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class CertError(Exception):
    """A certificate that cannot be served; ``key`` is the config key path."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def read_password(cf: CertFile) -> bytes | None:
    if cf.password_env:
        value = os.environ.get(cf.password_env)
        if value is None:
            raise ValueError(f"environment variable {cf.password_env} is not set")
        return value.encode()
    if cf.password_file:
        with open(cf.password_file, "rb") as f:
            return f.read().rstrip(b"\r\n")
    return None


def new_context(prof: Profile, client_auth: ClientAuth | None, tickets: bool) -> ssl.SSLContext:
    """A server context set to ``prof``, without a certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[prof.min_version]
    ctx.maximum_version = _VERSIONS[prof.max_version]
    if prof.ciphers is not None:
        ctx.set_ciphers(prof.ciphers)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE  # Mozilla: the client's order (all strong)
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(list(prof.alpn))
    if not openssl.set_groups(ctx, prof.groups):
        log.debug("cannot restrict key-exchange groups: OpenSSL's defaults apply")
    if client_auth is not None:
        ctx.load_verify_locations(cafile=client_auth.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if client_auth.mode == "require" else ssl.CERT_OPTIONAL
    return ctx


@dataclass(slots=True)
class LoadedCert:
    names: list[str]
    not_after: dt.datetime
    context: ssl.SSLContext


def load_cert(
    cf: CertFile, key: str, prof: Profile, auth: ClientAuth | None, tickets: bool, now: dt.datetime
) -> LoadedCert:
    """One certificate as an SSLContext; CertError naming ``key`` when it cannot serve."""
    try:
        with open(cf.cert, "rb") as f:
            cert_pem = f.read()
    except OSError as exc:
        raise CertError(f"{key}.cert", f"cannot read {cf.cert}: {exc.strerror}") from None
    try:
        with open(cf.key, "rb") as f:
            key_pem = f.read()
    except OSError as exc:
        raise CertError(f"{key}.key", f"cannot read {cf.key}: {exc.strerror}") from None
    try:
        password = read_password(cf)
    except (OSError, ValueError) as exc:
        where = "password_env" if cf.password_env else "password_file"
        raise CertError(f"{key}.{where}", str(exc)) from None
    try:
        facts = inspect(cert_pem, key_pem, password, now)
    except ValueError as exc:
        raise CertError(f"{key}.cert", f"{cf.cert}: {exc}") from None
    if facts.errors:
        # Key-related reasons belong to the key's path (as in ``portico check``).
        on_key = all("key" in e or "password" in e for e in facts.errors)
        where, path = ("key", cf.key) if on_key else ("cert", cf.cert)
        raise CertError(f"{key}.{where}", f"{path}: {'; '.join(facts.errors)}")
    ctx = new_context(prof, auth, tickets)
    try:
        ctx.load_cert_chain(cf.cert, cf.key, password=password)
    except (ssl.SSLError, OSError) as exc:
        raise CertError(f"{key}.key", f"{cf.key}: {exc}") from None
    return LoadedCert(facts.names, facts.not_after, ctx)


def _mtimes(listener: TlsListener) -> tuple[float, ...]:
    stamps: list[float] = []
    for cf in listener.all_certs():
        for path in (cf.cert, cf.key, cf.password_file):
            if path:
                try:
                    stamps.append(os.stat(path).st_mtime)
                except OSError:
                    stamps.append(-1.0)
    return tuple(stamps)


class CertStore:
    """The certificates of one TLS listener, selectable by SNI, replaceable at run time."""

    def __init__(self, listener: TlsListener, key: str) -> None:
        self.key = key  # "tls[0]"
        self.listener = listener
        self.table: NameTable[LoadedCert] = self._load(listener)
        self.stamps = _mtimes(listener)
        prof = profile(listener.profile)
        # The base context: the default certificate too, for a client whose handshake never
        # reaches the callback's switch (it always does in OpenSSL 1.1.1+, even without SNI).
        self.base = new_context(prof, listener.client_auth, listener.session_tickets)
        default = listener.all_certs()[listener.default_cert]
        self.base.load_cert_chain(default.cert, default.key, password=read_password(default))
        self.base.sni_callback = self._on_sni
        # Counters for the admin API: TCP connections accepted, handshakes completed, and
        # SNI callbacks run. accepted - established = handshakes cut (garbage, stalled,
        # timed out, plain HTTP, refused client certificate) or still in progress.
        self.handshakes = 0
        self.accepted = 0
        self.established = 0
        # TLS-ALPN-01 answers (RFC 8737) by name, served while an ACME order is pending.
        self.challenges: dict[str, ssl.SSLContext] = {}
        self.ticket_epoch = -1
        self.rotate_tickets(time.time())

    def rotate_tickets(self, now: float) -> None:
        """Install the ticket key of the period ``now`` is in (policy.tickets), if new.
        Tickets are encrypted with the base context's key: OpenSSL keeps the first context
        of a connection as its session context, whatever SNI switches to."""
        secret = self.listener.ticket_secret
        if not self.listener.session_tickets or not secret:
            return
        epoch = period(now)
        if epoch == self.ticket_epoch:
            return
        if openssl.set_ticket_key(self.base, ticket_key(secret.encode(), epoch)):
            self.ticket_epoch = epoch
        elif self.ticket_epoch == -1:
            self.ticket_epoch = epoch  # say it once
            log.warning(
                "%s: cannot set session-ticket keys (OpenSSL not reachable through ctypes):"
                " each worker resumes only its own sessions", self.key
            )

    def _load(self, listener: TlsListener) -> NameTable[LoadedCert]:
        prof = profile(listener.profile)
        now = dt.datetime.now(dt.UTC)
        loaded = [
            load_cert(
                cf,
                f"{self.key}.certs[{i}]" if i < len(listener.certs) else f"{self.key}.auto",
                prof,
                listener.client_auth,
                listener.session_tickets, now,
            )
            for i, cf in enumerate(listener.all_certs())
        ]
        return NameTable(((c.names, c) for c in loaded), loaded[listener.default_cert])

    def _on_sni(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, base: ssl.SSLContext
    ) -> None:
        self.handshakes += 1
        if self.challenges and name:
            answer = self.challenges.get(name.lower())
            if answer is not None:
                sslobj.context = answer
                return
        sslobj.context = self.table.select(name).context

    def set_challenge(self, name: str, pems: tuple[bytes, bytes] | None) -> None:
        """Serve (or stop serving) a TLS-ALPN-01 answer for ``name``."""
        if pems is None:
            self.challenges.pop(name.lower(), None)
            return
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["acme-tls/1"])
        # ssl loads certificates from files only: a private temporary directory it is.
        with tempfile.TemporaryDirectory(prefix="portico-alpn-") as tmp:
            cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            with open(cert, "wb") as f:
                f.write(pems[0])
            with open(key, "wb") as f:
                f.write(pems[1])
            ctx.load_cert_chain(cert, key)
        self.challenges[name.lower()] = ctx

    def reload(self, listener: TlsListener | None = None) -> bool:
        """Load the files again (of ``listener``, a reloaded config's, or the running one).
        True when swapped in; on any error the running set stays and the reason is logged."""
        listener = listener or self.listener
        stamps = _mtimes(listener)
        try:
            table = self._load(listener)
        except CertError as exc:
            self.stamps = stamps  # tried: wait for the next change before trying again
            log.error("certificate refused, keeping the running one: %s", exc)
            return False
        self.table, self.listener, self.stamps = table, listener, stamps
        names = sorted({n for c in [table.default, *table.exact.values()] for n in c.names})
        log.info("%s: certificates loaded for %s", self.key, ", ".join(names))
        return True

    def stats(self) -> dict[str, int]:
        return {
            "accepted": self.accepted,
            "established": self.established,
            "not_established": self.accepted - self.established,
            "sni_callbacks": self.handshakes,
        }

    def changed_on_disk(self) -> bool:
        return _mtimes(self.listener) != self.stamps


def cert_headers(sslobj: ssl.SSLObject | None, auth: ClientAuth) -> bytes:
    """Header lines about the verified client certificate, b"" when there is none."""
    if sslobj is None:
        return b""
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        return b""
    out = b""
    if auth.subject_header:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        value = subject.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")
        out += auth.subject_header.encode("ascii") + b": " + value + b"\r\n"
    if auth.fingerprint_header:
        fp = hashlib.sha256(der).hexdigest().encode("ascii")
        out += auth.fingerprint_header.encode("ascii") + b": " + fp + b"\r\n"
    return out


def connection_factory(ctx: ProxyContext, store: CertStore) -> Callable[[], ClientConnection]:
    """Protocol factory of a TLS listener: a ``ClientConnection`` that knows it speaks HTTPS
    (asyncio calls ``connection_made`` only once the handshake has completed)."""

    def made(conn: ClientConnection, transport: asyncio.BaseTransport) -> None:
        client = conn.client
        client.proto = b"https"
        store.established += 1
        auth = store.listener.client_auth  # the running one: a reload may change it
        if auth is not None:
            client.cert_headers = cert_headers(transport.get_extra_info("ssl_object"), auth)

    def make() -> ClientConnection:
        conn = ClientConnection(ctx)
        conn.on_made = made
        store.accepted += 1  # made at accept, before the handshake (asyncio's SSL protocol)
        return conn

    return make
