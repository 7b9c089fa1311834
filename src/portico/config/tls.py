"""TLS settings: listeners that terminate TLS, HTTPS redirects, HSTS and TLS to backends.

Only the schema lives here. Files named here are read by ``dataplane.tls`` (serving) and
checked by ``control.tlscheck`` (``portico check``); profiles are data in ``policy.tlsprofile``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from portico.config.types import _TOKEN, ListenAddress, NonNegSeconds, PositiveSeconds, Strict

# RFC 6797 6.1.1: a year is what the HSTS preload list asks for.
HSTS_YEAR = 31536000


class CertFile(Strict):
    """One certificate: a PEM chain (leaf first) and its private key. The names it serves
    are read from the certificate itself (subjectAltName DNS names, else the CN)."""

    cert: str = Field(description="PEM file: the certificate, then its intermediates")
    key: str = Field(description="PEM private key; may be encrypted (password_file/_env)")
    password_file: str | None = Field(None, description="file holding the key's password")
    password_env: str | None = Field(None, description="environment variable with the password")

    @model_validator(mode="after")
    def _one_password(self) -> CertFile:
        if self.password_file and self.password_env:
            raise ValueError("give password_file or password_env, not both")
        return self


class ClientAuth(Strict):
    """Client certificates (mTLS) on a TLS listener."""

    mode: Literal["require", "request"] = Field(
        "require", description="require: no valid certificate, no connection; request: optional"
    )
    ca: str = Field(description="PEM file of the CA(s) client certificates must chain to")
    subject_header: str | None = Field(
        "X-Client-Cert-Subject", description="header with the verified subject; unset = none"
    )
    fingerprint_header: str | None = Field(
        "X-Client-Cert-Fingerprint", description="header with the SHA-256 fingerprint (hex)"
    )

    @field_validator("subject_header", "fingerprint_header")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        if v is not None and not _TOKEN.match(v):
            raise ValueError(f"{v!r} is not a header name")
        return v


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


class AutoCerts(Strict):
    """Certificates Portico obtains and renews itself: from an ACME directory (RFC 8555), or
    from its own internal CA for local development."""

    names: list[str] = Field(description="DNS names of the certificate (the first is its name)")
    issuer: Literal["acme", "internal"] = Field(
        "acme", description="acme: from `directory`; internal: Portico's own local CA"
    )
    directory: str = Field(LETS_ENCRYPT, description="ACME directory URL")
    directory_ca: str | None = Field(
        None, description="PEM CA file to verify the directory's HTTPS with; unset = system"
    )
    email: str | None = Field(None, description="contact of the ACME account")
    challenge: Literal["http-01", "tls-alpn-01"] = Field(
        "http-01", description="http-01: on a plain listener, port 80; tls-alpn-01: port 443"
    )
    state_dir: str = Field(
        "portico-certs", description="directory for the account key, certificates and keys"
    )
    renew_at: float = Field(
        2 / 3, gt=0, lt=1, description="renew once this share of the lifetime has passed"
    )
    retry_min: PositiveSeconds = Field(60.0, description="first wait after a failed attempt")
    retry_max: PositiveSeconds = Field(3600.0, description="longest wait between attempts")

    @field_validator("names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one name is needed")
        for name in v:
            if not name or any(c in name for c in "/ :") or name.startswith("*"):
                raise ValueError(f"{name!r} is not a DNS name (no wildcards: HTTP-01 cannot)")
        return v


class TlsListener(Strict):
    """Addresses that speak HTTPS, with the certificates they serve."""

    listen: list[ListenAddress] = Field(description="addresses to listen on with TLS")
    certs: list[CertFile] = Field(
        default_factory=list, description="certificates, chosen by SNI among their names"
    )
    default_cert: int = Field(
        0, ge=0, description="index in certs served to clients that send no known name"
    )
    profile: Literal["intermediate", "modern"] = Field(
        "intermediate", description="Mozilla profile: intermediate (TLS 1.2+), modern (1.3)"
    )
    handshake_timeout: PositiveSeconds = Field(
        10.0, description="a TLS handshake slower than this is cut"
    )
    reload_check: NonNegSeconds = Field(
        2.0, description="seconds between checks of the certificate files; 0 = SIGHUP only"
    )
    client_auth: ClientAuth | None = Field(None, description="client certificates; unset = off")
    auto: AutoCerts | None = Field(
        None, description="a certificate Portico obtains and renews (ACME or internal CA)"
    )
    session_tickets: bool = Field(True, description="TLS session resumption by tickets")
    ticket_secret: str | None = Field(
        None,
        description="secret the session-ticket keys derive from; unset = random per start"
        " (shared by the workers); the same value on several gateways lets them resume"
        " each other's sessions",
    )

    @field_validator("listen", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _certs(self) -> TlsListener:
        if not self.listen:
            raise ValueError("listen: at least one address is needed")
        if not self.certs and self.auto is None:
            raise ValueError("certs: at least one certificate is needed (or auto)")
        if self.default_cert >= len(self.all_certs()):
            raise ValueError(f"default_cert: there are {len(self.all_certs())} certificate(s)")
        return self

    def all_certs(self) -> list[CertFile]:
        """The configured certificates, then the automatic one (files in its state dir)."""
        return [*self.certs, *([auto_files(self.auto)] if self.auto is not None else [])]


def auto_files(auto: AutoCerts) -> CertFile:
    """Where the automatic certificate of ``auto`` lives: one directory per first name."""
    base = f"{auto.state_dir}/{auto.issuer}/{auto.names[0]}"
    return CertFile(cert=f"{base}/fullchain.pem", key=f"{base}/key.pem")


class Hsts(Strict):
    """Strict-Transport-Security on responses sent over HTTPS (never over plain HTTP)."""

    max_age: int = Field(HSTS_YEAR, ge=0, description="seconds browsers remember HTTPS-only")
    include_subdomains: bool = False
    preload: bool = False

    def value(self) -> str:
        v = f"max-age={self.max_age}"
        if self.include_subdomains:
            v += "; includeSubDomains"
        if self.preload:
            v += "; preload"
        return v


def hsts_flag(v: object) -> object:
    """``hsts = true`` is the short form of ``[hsts]`` with defaults."""
    return {} if v is True else None if v is False else v


class BackendTls(Strict):
    """How Portico speaks TLS to ``https://`` backends of an upstream."""

    verify: bool = Field(True, description="verify the backend's certificate and name")
    ca: str | None = Field(None, description="PEM CA file; unset = the system store")
    server_name: str | None = Field(
        None, description="SNI and name checked; unset = the backend URL's host"
    )
    cert: str | None = Field(None, description="client certificate (PEM) to present")
    key: str | None = Field(None, description="its private key")

    @model_validator(mode="after")
    def _pair(self) -> BackendTls:
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key go together")
        return self
