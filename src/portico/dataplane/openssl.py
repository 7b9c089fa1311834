"""Two OpenSSL settings Python's ``ssl`` module does not expose, set through ``ctypes``:
the key-exchange groups (Mozilla names three) and the session-ticket keys (so every worker
can resume a session another one started).

Safety. ``SSLContext`` is CPython's ``PySSLContext``, whose first field after ``PyObject_HEAD``
is the ``SSL_CTX *``. That layout is CPython's private detail, so it is verified before any
use: ``SSL_CTX_get_options`` on the pointer read must return exactly ``ctx.options`` (which
CPython itself reads through the same function), for two different option sets, and the
libssl loaded by name must be the one the ``_ssl`` module links to (only one libssl is
mapped in the process). If any check fails, nothing is written and the caller is told
(``available()`` False): Portico then runs with OpenSSL's defaults and says so in the log.
"""

from __future__ import annotations

import ctypes
import ssl

from portico.policy.tickets import TICKET_KEY_BYTES

# From openssl/ssl.h (stable across 1.1.1 and 3.x).
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
SSL_CTRL_SET_GROUPS_LIST = 92

_lib: ctypes.CDLL | None = None
_checked = False


def _libssl() -> ctypes.CDLL | None:
    global _lib, _checked
    if _checked:
        return _lib
    _checked = True
    try:
        with open("/proc/self/maps") as f:
            mapped = {line.split()[-1] for line in f if "libssl.so" in line}
        if len(mapped) != 1:
            return None
        lib = ctypes.CDLL(mapped.pop())
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    except (OSError, AttributeError, IndexError):
        return None
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for flip in (0, ssl.OP_NO_TICKET):
        probe.options ^= flip
        ptr = _pointer(probe)
        if not ptr or lib.SSL_CTX_get_options(ptr) != int(probe.options):
            return None
    _lib = lib
    return _lib


def _pointer(ctx: ssl.SSLContext) -> int | None:
    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value


def available() -> bool:
    return _libssl() is not None


def _ctrl(ctx: ssl.SSLContext, cmd: int, larg: int, parg: bytes) -> bool:
    lib = _libssl()
    if lib is None:
        return False
    ptr = _pointer(ctx)
    if not ptr or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        return False
    buf = ctypes.create_string_buffer(parg, len(parg))
    if lib.SSL_CTX_ctrl(ptr, cmd, larg, buf):
        return True
    lib.ERR_clear_error()  # leave no error queued for the next ssl call to misreport
    return False


def set_groups(ctx: ssl.SSLContext, groups: str) -> bool:
    """Restrict key exchange to ``groups`` (``"X25519:prime256v1:secp384r1"``)."""
    return _ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii") + b"\0")


def set_ticket_key(ctx: ssl.SSLContext, key: bytes) -> bool:
    """Encrypt and decrypt session tickets with ``key`` (80 bytes) from now on."""
    if len(key) != TICKET_KEY_BYTES:
        raise ValueError(f"a ticket key is {TICKET_KEY_BYTES} bytes")
    return _ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, key)

