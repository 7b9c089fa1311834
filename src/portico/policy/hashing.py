"""Affinity: the same key goes to the same endpoint. Hash balancers and the sticky cookie.

Two ways to keep a client on one backend:

* **Hashing** (``ip_hash``, ``consistent_hash``): the endpoint is a function of a key the
  caller supplies (client IP, a header, a cookie, the path). No state, nothing sent to the
  client, and every worker and every Portico instance agrees. Rendezvous (highest random
  weight) hashing scores each endpoint by ``hash(endpoint, key)`` and takes the best, so
  removing an endpoint moves only the keys it held and adding one takes only the keys it now
  wins: about 1/N of them either way, where ``hash(key) % N`` would move almost all.
* **Sticky cookie** (``StickyCookie``): the first pick is made by any balancer and the
  response sets a cookie naming that backend; later requests go back to it while it is
  available. Survives pool changes exactly (the cookie names the address, not an index) but
  needs the response path to set a cookie.

Hashes are blake2b over UTF-8 bytes, never Python's ``hash()``, which is salted per process:
workers, restarts and other instances must all map a key to the same backend.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
from collections.abc import Sequence

from portico.policy.candidate import C, Candidate

_TWO_64 = float(2**64)

_VERIFIED_CACHE_MAX = 1024
"""Verified cookie values remembered, to skip the HMAC on the hot path. Only values we signed
ever verify, so this holds one entry per backend address ever used; the bound is a backstop."""

_TAG_BYTES = 16
"""128 bits of HMAC-SHA256: forging one is a 2**128 search, and the cookie stays short."""


_PREFIXES: dict[str, hashlib.blake2b] = {}
"""blake2b state after hashing each endpoint label: copying it and adding the key costs half
of hashing label and key from scratch, on every pick, for every candidate."""

_PREFIXES_MAX = 4096
"""Labels come from config, not from clients; the bound only guards against endless churn."""


def _hash(label: str, key: bytes) -> int:
    prefix = _PREFIXES.get(label)
    if prefix is None:
        if len(_PREFIXES) >= _PREFIXES_MAX:
            _PREFIXES.clear()
        prefix = _PREFIXES[label] = hashlib.blake2b(label.encode() + b"\x00", digest_size=8)
    h = prefix.copy()
    h.update(key)
    return int.from_bytes(h.digest(), "big")


def rendezvous(endpoints: Sequence[C], key: str) -> C | None:
    """The endpoint with the highest weighted rendezvous score for ``key``.

    Weighted as in Schindelhauer and Schomaker: score = w / -ln(u) with u = hash in (0, 1),
    which gives each endpoint a share of keys proportional to its effective weight
    (``weight * ramp``). With equal weights that is simply the highest hash, with no logs.
    A ramping endpoint (slow start) only gains keys as its factor grows: keys move to it
    gradually and never away from it and back.
    """
    if not endpoints:
        return None
    kb = key.encode()
    best: C | None = None
    first_w = endpoints[0].weight * endpoints[0].ramp
    for ep in endpoints:
        if ep.weight * ep.ramp != first_w:
            break
    else:
        best_h = -1
        for ep in endpoints:
            h = _hash(ep.label, kb)
            if h > best_h:
                best, best_h = ep, h
        return best
    best_score = -1.0
    for ep in endpoints:
        u = (_hash(ep.label, kb) + 0.5) / _TWO_64
        score = ep.weight * ep.ramp / -math.log(u)
        if score > best_score:
            best, best_score = ep, score
    return best


class ConsistentHash:
    """Rendezvous hashing on a key the caller chooses; round robin when there is no key.

    Use it when a backend holds per-key state worth reusing (a cache shard, a session held
    in memory, a tenant's warm data) and the key is in the request (a header, a cookie, the
    path). Load is as even as the keys are: one very hot key still lands on one backend.
    Cost per pick is one small hash per candidate.
    """

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def _fallback(self, endpoints: Sequence[C]) -> C | None:
        n = len(endpoints)
        if n == 0:
            return None
        i = self._next % n
        self._next = i + 1
        return endpoints[i]

    def pick(self, endpoints: Sequence[C], key: str | None = None) -> C | None:
        if key is None:
            return self._fallback(endpoints)
        return rendezvous(endpoints, key)


class IpHash(ConsistentHash):
    """Rendezvous hashing on the client IP: client affinity with no cookie and no config.

    Clients behind one NAT or corporate proxy share an IP and so a backend; use a sticky
    cookie when that skews load. An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, from a
    dual-stack listener) hashes as the plain IPv4 address, so one client maps to one backend
    whichever listener it came through.
    """

    __slots__ = ()

    def pick(self, endpoints: Sequence[C], key: str | None = None) -> C | None:
        if key is None:
            return self._fallback(endpoints)
        if key.startswith("::ffff:") and "." in key:
            key = key[7:]
        return rendezvous(endpoints, key)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StickyCookie:
    """Signs and checks cookie values that name a backend: ``<address>.<HMAC tag>``.

    The value names the backend by address (``host:port``, base64url), so it stays valid
    across reloads that reorder, add or remove other backends. The tag is HMAC-SHA256 of the
    address under ``secret`` and ``scope`` (the upstream name), so a client can replay a value
    it was given but cannot forge one for a backend of its choosing, nor carry a value from
    one upstream to another. Every worker must be given the same secret.
    """

    __slots__ = ("_key", "_scope", "_signed", "_verified")

    def __init__(self, secret: bytes, scope: str = "") -> None:
        if len(secret) < 16:
            raise ValueError("sticky cookie secret must be at least 16 bytes")
        self._key = secret
        self._scope = scope.encode()
        self._signed: dict[str, str] = {}  # label -> cookie value
        self._verified: dict[str, str] = {}  # cookie value -> label

    def _tag(self, label: str) -> bytes:
        msg = b"portico-sticky\x00" + self._scope + b"\x00" + label.encode()
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:_TAG_BYTES]

    def _sign(self, label: str) -> str:
        return _b64(label.encode()) + "." + _b64(self._tag(label))

    def value_for(self, endpoint: Candidate) -> str:
        """The cookie value to set when a response came from ``endpoint``."""
        value = self._signed.get(endpoint.label)
        if value is None:
            value = self._signed[endpoint.label] = self._sign(endpoint.label)
        return value

    def backend_of(self, value: str) -> str | None:
        """The address label a cookie value names, or None if it is malformed or forged."""
        label = self._verified.get(value)
        if label is not None:
            return label
        name, dot, _ = value.partition(".")
        if not dot:
            return None
        try:
            label = _unb64(name).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        # Compare the whole canonical value, not just the tag: base64 decoding tolerates
        # variants (stray characters, padding), and only one spelling should ever verify.
        if not hmac.compare_digest(value.encode(), self._sign(label).encode()):
            return None
        if len(self._verified) >= _VERIFIED_CACHE_MAX:
            self._verified.clear()
        self._verified[value] = label
        return label

    def pick(self, value: str | None, endpoints: Sequence[C]) -> C | None:
        """The candidate the cookie names, or None: then pick with the balancer and re-set.

        ``endpoints`` are the candidates from ``select_candidates``, so a cookie naming a
        backend that is down, draining, ejected or already tried is ignored, never obeyed.
        """
        if not value:
            return None
        label = self.backend_of(value)
        if label is None:
            return None
        for ep in endpoints:
            if ep.label == label:
                return ep
        return None
