"""Session-ticket keys shared by processes that never talk: each derives the key of the
current rotation period from a common secret, so all workers (and several gateways given the
same ``ticket_secret``) encrypt and decrypt each other's tickets, and rotate in step.

OpenSSL takes one ticket key at a time (``SSL_CTX_set_tlsext_ticket_keys``), so a ticket
issued in the previous period no longer decrypts after a rotation: that client does one full
handshake and gets a new ticket. Twelve hours keeps a stolen key's window short (Mozilla
advises rotating at least daily) at the cost of one full handshake per client per period.
"""

from __future__ import annotations

import hashlib
import hmac

ROTATE_EVERY = 12 * 3600.0
# OpenSSL 1.1.0+: 16 bytes key name, 32 bytes HMAC secret, 32 bytes AES key.
TICKET_KEY_BYTES = 80


def period(now: float, every: float = ROTATE_EVERY) -> int:
    """The rotation period ``now`` (wall-clock seconds) falls in."""
    return int(now // every)


def ticket_key(secret: bytes, epoch: int) -> bytes:
    """The 80-byte ticket key of period ``epoch``."""
    out = b""
    block = 0
    while len(out) < TICKET_KEY_BYTES:
        msg = b"portico-ticket-key:%d:%d" % (epoch, block)
        out += hmac.new(secret, msg, hashlib.sha256).digest()
        block += 1
    return out[:TICKET_KEY_BYTES]
