"""A fixed-size table of per-key limiter state, in any writable buffer.

Theory of operation. The buffer holds ``buckets`` of ``SLOTS`` slots; a slot is a 64-bit key
hash and a float (a GCRA TAT for rate limits, a count for concurrency limits). A key lives
in bucket ``hash % buckets``, in any of its slots, so a lookup reads one 128-byte bucket.
Memory never grows: a new key takes an empty slot, else the slot whose state is *spent* (a
TAT in the past, a count of 0), which loses nothing because spent state decides exactly like
no state. Only when every slot of the bucket holds live state is the one closest to expiry
evicted (counted in ``evicted``): a flood of distinct keys can then give some keys a fresh
allowance, but never costs memory or time per request.

The same class serves one process (a private buffer, no locks) and several workers (a
shared-memory buffer created by the master before it spawns them, with striped locks so
workers only contend when they touch the same stripe). Either way the read-decide-write
of one key happens under one lock, which is what makes the limit exact across workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from portico.policy.ratelimit import REJECT, Limit, gcra

SLOTS = 8
BUCKET_BYTES = SLOTS * 16  # 128: two cache lines
# Lock stripes: enough that 4-16 workers rarely wait on each other, few enough to pass to
# every spawned worker cheaply.
STRIPES = 64


class Lock(Protocol):
    def acquire(self, block: bool = True, timeout: float | None = None) -> bool: ...
    def release(self) -> None: ...


def table_bytes(max_keys: int) -> int:
    """Bytes for a table of at least ``max_keys`` slots (16 bytes a key)."""
    buckets = max(1, -(-max_keys // SLOTS))
    return buckets * BUCKET_BYTES


def key_hash(data: bytes) -> int:
    """A key's slot identity: ``hash()`` (SipHash, keyed by the interpreter's secret), as 64
    bits, never 0 (which marks an empty slot). Keyed, so a client cannot choose keys that
    collide with another's; fast (0.1 us against 1 us for blake2b). Workers sharing a table
    must share the secret: the master starts them with one PYTHONHASHSEED
    (dataplane.sharedmem)."""
    return hash(data) & 0xFFFF_FFFF_FFFF_FFFF or 1


def stable_hash(data: bytes) -> int:
    """The same 64 bits in every process and on every host (Redis keys of several gateways)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


class LimitTable:
    __slots__ = ("buckets", "buf", "evicted", "full", "keys", "locks", "nlocks", "values")

    def __init__(self, buf: memoryview, locks: Sequence[Lock] | None = None) -> None:
        self.buf = buf
        self.buckets = len(buf) // BUCKET_BYTES
        if self.buckets < 1:
            raise ValueError("buffer smaller than one bucket")
        # Two views of the same bytes: word 2i of a bucket is a key, word 2i+1 its value.
        # Indexing them costs less than unpacking a whole bucket per request.
        size = self.buckets * BUCKET_BYTES
        self.keys = buf[:size].cast("Q")
        self.values = buf[:size].cast("d")
        self.locks = list(locks) if locks else []
        self.nlocks = len(self.locks)
        self.evicted = 0  # live entries dropped for a new key (per process)
        self.full = 0  # count acquires let through because a bucket was full of live counts

    def _find(self, key: int, base: int) -> int:
        """The word index of ``key``'s slot in the bucket at ``base``, or -1."""
        keys = self.keys
        for i in range(base, base + 2 * SLOTS, 2):
            if keys[i] == key:
                return i
        return -1

    def _victim(self, base: int) -> tuple[int, float]:
        """The slot with the smallest value (empty and spent slots first) and that value."""
        values = self.values
        best, least = base, values[base + 1]
        for i in range(base + 2, base + 2 * SLOTS, 2):
            v = values[i + 1]
            if v < least:
                best, least = i, v
        return best, least

    def rate(self, key: int, limit: Limit, now: float) -> tuple[int, float, float]:
        """GCRA for ``key``: ``(verdict, tat, wait)`` (see ``policy.ratelimit.gcra``)."""
        b = key % self.buckets
        base = b * 2 * SLOTS
        lock = self.locks[b % self.nlocks] if self.nlocks else None
        if lock is not None:
            lock.acquire()
        try:
            keys = self.keys
            # The hot case inline: a client's key sits in the first slot it took.
            i = base if keys[base] == key else self._find(key, base)
            if i >= 0:
                tat = self.values[i + 1]
            else:
                i, oldest = self._victim(base)
                if oldest > now:
                    self.evicted += 1
                tat = 0.0
            verdict, new, wait = gcra(tat, now, limit.interval, limit.tolerance, limit.max_delay)
            if verdict != REJECT:
                keys[i] = key
                self.values[i + 1] = new
            return verdict, new, wait
        finally:
            if lock is not None:
                lock.release()

    def refund(self, key: int, interval: float) -> None:
        """Give back one request a later limit refused (GCRA updates add, so this is exact)."""
        self._add(key, -interval)

    def acquire(self, key: int, most: int) -> bool:
        """Count one more in flight for ``key`` unless ``most`` already are."""
        b = key % self.buckets
        base = b * 2 * SLOTS
        lock = self.locks[b % self.nlocks] if self.nlocks else None
        if lock is not None:
            lock.acquire()
        try:
            i = self._find(key, base)
            if i >= 0:
                count = self.values[i + 1]
            else:
                i, least = self._victim(base)
                if least > 0:
                    self.full += 1
                    return True  # no room to count: admit rather than refuse an innocent key
                count = 0.0
            if count >= most:
                return False
            self.keys[i] = key
            self.values[i + 1] = count + 1
            return True
        finally:
            if lock is not None:
                lock.release()

    def release(self, key: int) -> None:
        self._add(key, -1.0)

    def count(self, key: int) -> float:
        i = self._find(key, (key % self.buckets) * 2 * SLOTS)
        return self.values[i + 1] if i >= 0 else 0.0

    def _add(self, key: int, delta: float) -> None:
        """Add ``delta`` to ``key``'s value, not below 0; nothing if the key is gone."""
        b = key % self.buckets
        lock = self.locks[b % self.nlocks] if self.nlocks else None
        if lock is not None:
            lock.acquire()
        try:
            i = self._find(key, b * 2 * SLOTS)
            if i >= 0:
                self.values[i + 1] = max(0.0, self.values[i + 1] + delta)
        finally:
            if lock is not None:
                lock.release()
