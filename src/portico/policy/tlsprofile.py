"""Mozilla's server-side TLS profiles as data (https://wiki.mozilla.org/Security/Server_Side_TLS,
version 5.7), and which one a listener runs. ``dataplane.tls`` applies them to an SSLContext.

Intermediate: TLS 1.2 and 1.3; for 1.2 only ECDHE key exchange with AEAD ciphers. Mozilla's
list also has three DHE-RSA suites; they are left out, as Python offers no way to load the
ffdhe2048 group Mozilla asks for and OpenSSL's built-in parameters would not match it.
Modern: TLS 1.3 only (its suites are all fine and OpenSSL's defaults are Mozilla's).
Both: no compression, no renegotiation, server cipher order off (clients pick, as Mozilla says
for these profiles, since every suite left is strong).
"""

from __future__ import annotations

from dataclasses import dataclass

TLS12, TLS13 = "TLSv1.2", "TLSv1.3"

INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


# Key exchange groups, both profiles (OpenSSL's default list adds x448, P-521 and the
# finite-field groups, which Mozilla leaves out).
MOZILLA_GROUPS = "X25519:prime256v1:secp384r1"


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    min_version: str
    max_version: str
    ciphers: str | None  # TLS 1.2 cipher string; None when 1.2 is off
    alpn: tuple[str, ...] = ("http/1.1",)
    groups: str = MOZILLA_GROUPS


PROFILES: dict[str, Profile] = {
    "intermediate": Profile("intermediate", TLS12, TLS13, INTERMEDIATE_CIPHERS),
    "modern": Profile("modern", TLS13, TLS13, None),
}


def profile(name: str) -> Profile:
    """The profile called ``name`` (the schema only lets known names through)."""
    return PROFILES[name]
