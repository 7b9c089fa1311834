"""What a certificate file says, and what is wrong with it, decided from bytes and ``now``.

Used twice: ``portico check`` reports each problem under the key path of the file, and the
data plane refuses a replaced file that has an error (keeping the running certificate). Parsing
is ``cryptography``'s; nothing here opens a file or reads a clock.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

# A configured certificate this close to its end is worth a warning (as Caddy and
# certbot warn): there is still time to renew it.
EXPIRY_WARNING = dt.timedelta(days=14)


@dataclass(slots=True)
class CertFacts:
    names: list[str]
    not_before: dt.datetime
    not_after: dt.datetime
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def load_chain(pem: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM file, in file order. Raises ValueError when there is none."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError("not a PEM certificate") from None
    return chain


def names_of(cert: x509.Certificate) -> list[str]:
    """DNS names the certificate serves: its subjectAltName, else its CN (RFC 6125)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return [str(cns[0].value)] if cns else []
    return [str(n) for n in san.value.get_values_for_type(x509.DNSName)]


def load_key(pem: bytes, password: bytes | None) -> PrivateKeyTypes:
    """The private key; ValueError with a reason a person understands otherwise."""
    try:
        return serialization.load_pem_private_key(pem, password)
    except TypeError as exc:
        # cryptography says TypeError for "encrypted but no password" and the reverse.
        if password is None:
            raise ValueError("the key is encrypted: set password_file or password_env") from exc
        raise ValueError("the key is not encrypted, but a password is set") from exc
    except ValueError as exc:
        why = str(exc).lower()
        if password is not None and ("password" in why or "decrypt" in why):
            raise ValueError("wrong password for the key") from exc
        raise ValueError(f"not a PEM private key ({exc})") from exc


def _public_bytes(obj: object) -> bytes:
    key = obj.public_key()  # type: ignore[attr-defined]
    return key.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def inspect(
    cert_pem: bytes, key_pem: bytes | None, password: bytes | None, now: dt.datetime
) -> CertFacts:
    """Facts and problems of a chain (leaf first) and its key. ``key_pem`` None: not checked."""
    chain = load_chain(cert_pem)
    leaf = chain[0]
    facts = CertFacts(names_of(leaf), leaf.not_valid_before_utc, leaf.not_valid_after_utc)
    for i in range(len(chain) - 1):
        # Each certificate must be issued by the next one: leaf, intermediate, ... (RFC 8446
        # 4.4.2). Clients that do not reorder fail on a chain written the other way round.
        if chain[i].issuer != chain[i + 1].subject:
            facts.errors.append(
                f"chain in the wrong order: certificate {i + 1} is not issued by"
                f" certificate {i + 2} (the leaf comes first, then its issuer)"
            )
            break
    if not facts.names:
        facts.errors.append("the certificate names no host (no subjectAltName DNS name or CN)")
    if now < facts.not_before:
        facts.errors.append(f"not valid before {facts.not_before:%Y-%m-%d %H:%M} UTC")
    if now >= facts.not_after:
        facts.errors.append(f"expired on {facts.not_after:%Y-%m-%d %H:%M} UTC")
    elif facts.not_after - now < EXPIRY_WARNING:
        facts.warnings.append(f"expires on {facts.not_after:%Y-%m-%d %H:%M} UTC")
    if key_pem is not None:
        try:
            key = load_key(key_pem, password)
        except ValueError as exc:
            facts.errors.append(str(exc))
        else:
            if _public_bytes(key) != _public_bytes(leaf):
                facts.errors.append("the key does not match the certificate")
    return facts
