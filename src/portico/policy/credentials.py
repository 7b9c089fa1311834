"""Basic-auth credentials: parsing the header, checking a password, remembering the good ones.

bcrypt and argon2 are slow on purpose (tens to hundreds of milliseconds per check): run on
the event loop, a handful of logins a second would stall every other request of the worker.
So a check happens at most once per credential and file version: a verified pair is
remembered under a keyed hash (HMAC-SHA256 with a per-process random key, so the table never
holds a password, nor anything a leaked core dump could brute-force faster than the
htpasswd file itself), for ``VERIFIED_TTL`` seconds. Only a miss runs the slow check, and
the stage runs it on a thread (the hash libraries release the GIL) while the loop goes on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from portico.config.htpasswd import ARGON2, BCRYPT

# Longest Authorization header value looked at: 255-byte users and passwords fit well.
MAX_CREDENTIALS = 1024
# Seconds a verified user:password is trusted without the slow check again.
VERIFIED_TTL = 300.0
# Verified pairs kept at most; when full the table is emptied (a flood of distinct valid
# logins costs a re-check each, never memory).
VERIFIED_MAX = 4096
def parse_basic(value: bytes) -> tuple[bytes, bytes] | None:
    """(user, password) from an ``Authorization: Basic ...`` value, or None."""
    if len(value) > MAX_CREDENTIALS:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep or not user:
        return None
    if any(b < 0x20 or b == 0x7F for b in user):
        return None  # the user may go upstream in a header: no CR, LF or other controls
    return user, password


def dummy_hash() -> tuple[str, bytes]:
    """A hash of a random secret, checked when the user is unknown, so a missing user takes
    as long as a wrong password (cost 10, `htpasswd -B`'s default)."""
    import bcrypt

    return BCRYPT, bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(10))


def check_password(kind: str, hashed: bytes, password: bytes) -> bool:
    """The slow check. Runs off the event loop (see the module docstring)."""
    if kind == BCRYPT:
        import bcrypt

        try:
            # bcrypt uses the first 72 bytes only; bcrypt>=5 refuses longer ones outright.
            return bool(bcrypt.checkpw(password[:72], hashed))
        except ValueError:
            return False
    if kind == ARGON2:
        from argon2 import PasswordHasher
        from argon2.exceptions import Argon2Error, InvalidHashError

        try:
            return bool(PasswordHasher().verify(hashed, password))
        except (Argon2Error, InvalidHashError):
            return False
    return False


class VerifiedCache:
    """user:password pairs checked good, under a keyed hash, per htpasswd file version."""

    __slots__ = ("entries", "key")

    def __init__(self) -> None:
        self.key = secrets.token_bytes(32)
        self.entries: dict[bytes, tuple[int, float]] = {}

    def digest(self, user: bytes, password: bytes) -> bytes:
        return hmac.new(self.key, user + b"\0" + password, hashlib.sha256).digest()

    def hit(self, digest: bytes, version: int, now: float) -> bool:
        entry = self.entries.get(digest)
        if entry is None:
            return False
        if entry[0] != version or entry[1] < now:
            del self.entries[digest]
            return False
        return True

    def remember(self, digest: bytes, version: int, now: float) -> None:
        if len(self.entries) >= VERIFIED_MAX:
            self.entries.clear()
        self.entries[digest] = (version, now + VERIFIED_TTL)
