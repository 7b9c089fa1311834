"""Where automatic certificates come from: an ACME directory (RFC 8555) or Portico's own CA.

Both are synchronous (they block on the network or the disk) and are run in a thread by
``control.acme``. Both return the full chain (leaf first) as PEM for a key they are given.

ACME is certbot's ``acme`` library: it is the client Let's Encrypt's own tooling runs, kept up
with the RFC and with Let's Encrypt's changes (nonce retries, account lookup, order
polling), which a small hand-written client would have to learn the hard way. It is
synchronous (``requests``), hence the thread. What it does not do for us is the TLS-ALPN-01
certificate (RFC 8737), made here with ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from portico.config.tls import AutoCerts

log = logging.getLogger("portico.acme")

# RFC 8737 3: the acmeIdentifier extension of a TLS-ALPN-01 certificate.
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
# Longest wait for an order to become valid and its certificate ready.
ORDER_DEADLINE = 90.0
# Leaf lifetime of the internal CA (short, like Caddy's: nothing to revoke) and the CA's own.
INTERNAL_LEAF_LIFETIME = dt.timedelta(days=7)
INTERNAL_CA_LIFETIME = dt.timedelta(days=3650)

# publish(kind, name_or_token, value): install (value) or remove (value None) a challenge
# answer in every process that serves traffic, then return once they have it.
Publish = Callable[[str, str, Any], None]


class IssueError(Exception):
    """Issuance failed; the message says why (the CA's own words where it gave any)."""


def new_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` atomically, readable by the owner only (keys)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def self_signed(
    names: list[str],
    key_pem: bytes,
    lifetime: dt.timedelta,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> bytes:
    """A self-signed certificate for ``names`` (placeholders, TLS-ALPN-01 answers)."""
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def tls_alpn_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) answering a TLS-ALPN-01 challenge for ``name`` (RFC 8737 3)."""
    digest = hashlib.sha256(key_authorization.encode()).digest()
    ext = x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest)  # OCTET STRING
    key_pem = new_key_pem()
    return self_signed([name], key_pem, dt.timedelta(days=1), [(ext, True)]), key_pem


class AcmeIssuer:
    """Orders certificates from an ACME directory with one account (key in the state dir)."""

    def __init__(self, auto: AutoCerts) -> None:
        self.auto = auto
        self.account_key_path = os.path.join(auto.state_dir, "acme", "account.key")

    def _client(self) -> Any:
        import josepy as jose
        from acme import client, errors, messages

        if not os.path.exists(self.account_key_path):
            write_private(self.account_key_path, new_key_pem())
        with open(self.account_key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        jwk = jose.jwk.JWKEC(key=key)
        verify: Any = self.auto.directory_ca or True  # requests takes a CA path here
        net = client.ClientNetwork(
            jwk, alg=jose.jwa.ES256, verify_ssl=verify, user_agent="portico"
        )
        directory = client.ClientV2.get_directory(self.auto.directory, net)
        acme = client.ClientV2(directory, net)
        contact = (f"mailto:{self.auto.email}",) if self.auto.email else ()
        registration = messages.NewRegistration.from_data(terms_of_service_agreed=True)
        if contact:
            registration = registration.update(contact=contact)
        try:
            acme.new_account(registration)
        except errors.ConflictError as exc:  # the key already has an account: use it
            net.account = messages.RegistrationResource(
                uri=exc.location, body=messages.Registration()
            )
        return acme, jwk

    def issue(self, key_pem: bytes, publish: Publish) -> bytes:
        import josepy as jose
        from acme import challenges, crypto_util, errors, messages

        names = list(self.auto.names)
        try:
            acme, jwk = self._client()
            order = acme.new_order(crypto_util.make_csr(key_pem, names))
        except (errors.Error, messages.Error, OSError) as exc:
            raise IssueError(f"{self.auto.directory}: {exc}") from None
        published: list[tuple[str, str]] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # authorized recently: nothing to prove
                name = authz.body.identifier.value
                chall = next(
                    (c for c in authz.body.challenges if _kind(c) == self.auto.challenge), None
                )
                if chall is None:
                    raise IssueError(f"{name}: the CA offers no {self.auto.challenge} challenge")
                token = chall.chall.to_partial_json()["token"]
                thumbprint = jose.b64.b64encode(jwk.thumbprint()).decode()
                key_authz = f"{token}.{thumbprint}"  # RFC 8555 8.1
                if self.auto.challenge == "http-01":
                    publish("http-01", token, key_authz)
                    published.append(("http-01", token))
                else:
                    publish("tls-alpn-01", name, tls_alpn_certificate(name, key_authz))
                    published.append(("tls-alpn-01", name))
                # The response is "{}" for both (RFC 8555 7.5.1); acme 5 dropped its own
                # TLS-ALPN-01 class, so the generic key-authorization response serves both.
                response = challenges.KeyAuthorizationChallengeResponse(key_authorization=key_authz)
                acme.answer_challenge(chall, response)
            deadline = dt.datetime.now() + dt.timedelta(seconds=ORDER_DEADLINE)
            order = acme.poll_and_finalize(order, deadline)
        except errors.ValidationError as exc:
            raise IssueError(_validation_reason(exc)) from None
        except errors.TimeoutError:
            raise IssueError(f"order not ready within {ORDER_DEADLINE:g}s") from None
        except (errors.Error, messages.Error, OSError) as exc:
            raise IssueError(str(exc)) from None
        finally:
            for kind, what in published:
                publish(kind, what, None)
        return order.fullchain_pem.encode()  # type: ignore[no-any-return]


def _kind(challb: Any) -> str:
    return str(challb.chall.to_partial_json().get("type", ""))


def _validation_reason(exc: Any) -> str:
    reasons = []
    for authz in exc.failed_authzrs:
        for chall in authz.body.challenges:
            if chall.error is not None:
                detail = chall.error.detail or chall.error.typ
                reasons.append(f"{authz.body.identifier.value}: {detail}")
    return "; ".join(reasons) or "challenge failed"


class InternalIssuer:
    """Portico's own CA (like Caddy's ``tls internal``): made once in the state dir, it signs
    short-lived certificates for the configured names. Clients trust it by importing its
    root (the log says how)."""

    def __init__(self, auto: AutoCerts) -> None:
        self.auto = auto
        base = os.path.join(auto.state_dir, "internal")
        self.ca_cert_path = os.path.join(base, "ca.pem")
        self.ca_key_path = os.path.join(base, "ca.key")

    def ensure_ca(self) -> bool:
        """Create the CA if it does not exist yet; True when it was just made."""
        if os.path.exists(self.ca_cert_path) and os.path.exists(self.ca_key_path):
            return False
        key_pem = new_key_pem()
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Portico internal CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + INTERNAL_CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
            )
            .sign(key, hashes.SHA256())
        )
        write_private(self.ca_key_path, key_pem)
        write_private(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(self.ca_cert_path, 0o644)
        return True

    def trust_hint(self) -> str:
        path = os.path.abspath(self.ca_cert_path)
        return (
            f"internal CA: {path}; to trust it: Debian/Ubuntu: sudo cp {path}"
            " /usr/local/share/ca-certificates/portico-internal.crt && sudo update-ca-certificates;"
            f" curl: --cacert {path}; Firefox/Chrome: import it as an authority"
        )

    def issue(self, key_pem: bytes, publish: Publish) -> bytes:
        self.ensure_ca()
        with open(self.ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), None)
        with open(self.ca_cert_path, "rb") as f:
            ca_pem = f.read()
        ca = x509.load_pem_x509_certificate(ca_pem)
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        now = dt.datetime.now(dt.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.auto.names[0])]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + INTERNAL_LEAF_LIFETIME)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in self.auto.names]), False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        return leaf.public_bytes(serialization.Encoding.PEM) + ca_pem


def issuer_for(auto: AutoCerts) -> AcmeIssuer | InternalIssuer:
    return AcmeIssuer(auto) if auto.issuer == "acme" else InternalIssuer(auto)
