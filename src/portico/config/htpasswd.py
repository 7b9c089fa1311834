"""The htpasswd file format, and which of its hash kinds Portico accepts.

Only slow, salted hashes are accepted: bcrypt (``$2y$``/``$2b$``/``$2a$``, what
``htpasswd -B`` writes) and argon2 (``$argon2id$``...). Plaintext, DES crypt, MD5
(``$apr1$``, ``$1$``), SHA1 (``{SHA}``) and SHA-crypt entries are refused with their line:
a stolen file of those is a list of passwords after an afternoon on one GPU.
"""

from __future__ import annotations

import re

BCRYPT = "bcrypt"
ARGON2 = "argon2"

_BCRYPT = re.compile(rb"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
_ARGON2 = re.compile(rb"^\$argon2(id|i|d)\$")
_WEAK = (
    (rb"$apr1$", "Apache MD5 ($apr1$)"),
    (rb"$1$", "MD5-crypt ($1$)"),
    (rb"{SHA}", "unsalted SHA-1 ({SHA})"),
    (rb"$5$", "SHA-256-crypt ($5$)"),
    (rb"$6$", "SHA-512-crypt ($6$)"),
)
_DES = re.compile(rb"^[./A-Za-z0-9]{13}$")
# Longest htpasswd file read: far more than any real one, and a bound on what a reload costs.
MAX_FILE = 4 * 1024 * 1024


class HtpasswdError(ValueError):
    pass


def hash_kind(hashed: bytes) -> str:
    """BCRYPT or ARGON2; raises HtpasswdError naming any other kind."""
    if _BCRYPT.match(hashed):
        return BCRYPT
    if _ARGON2.match(hashed):
        return ARGON2
    for prefix, name in _WEAK:
        if hashed.startswith(prefix):
            raise HtpasswdError(f"{name} hashes are refused; use bcrypt (htpasswd -B) or argon2")
    if _DES.match(hashed):
        raise HtpasswdError("DES crypt hashes are refused; use bcrypt (htpasswd -B) or argon2")
    raise HtpasswdError("a plaintext password is refused; use bcrypt (htpasswd -B) or argon2")


def parse_htpasswd(data: bytes) -> dict[bytes, tuple[str, bytes]]:
    """user -> (kind, hash). Raises HtpasswdError with the line number of the first problem."""
    if len(data) > MAX_FILE:
        raise HtpasswdError(f"larger than {MAX_FILE} bytes")
    users: dict[bytes, tuple[str, bytes]] = {}
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, hashed = line.partition(b":")
        if not sep or not user or not hashed:
            raise HtpasswdError(f"line {number}: not user:hash")
        try:
            kind = hash_kind(hashed)
        except HtpasswdError as e:
            raise HtpasswdError(
                f"line {number} (user {user.decode('latin-1')!r}): {e}"
            ) from None
        if user in users:
            raise HtpasswdError(f"line {number}: user {user.decode('latin-1')!r} appears twice")
        users[user] = (kind, hashed)
    return users
