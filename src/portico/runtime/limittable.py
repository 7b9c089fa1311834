"""A fixed-size table of per-key limiter state, in any writable buffer.

Theory of operation. The buffer holds ``buckets`` of ``SLOTS`` slots; a slot is a 64-bit key
hash and a float (a GCRA TAT for rate limits, a count for concurrency limits). A key lives
in bucket ``hash % buckets``, in any of its slots, so a lookup reads one 128-byte bucket with
one ``unpack_from``. Memory never grows: a new key takes an empty slot, else the slot whose
state is *spent* (a TAT in the past, a count of 0), which loses nothing because spent state
decides exactly like no state. Only when every slot of the bucket holds live state is the
one closest to expiry evicted (counted in ``evicted``): a flood of distinct keys can then
give some keys a fresh allowance, but never costs memory or time per request.

The same class serves one process (a private buffer, no locks) and several workers (a
shared-memory buffer created by the master before it spawns them, with striped locks so
workers only contend when they touch the same stripe). Either way the read-decide-write
of one key happens under one lock, which is what makes the limit exact across workers.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Protocol

from portico.policy.ratelimit import REJECT, Limit

SLOTS = 8
_BUCKET = struct.Struct("<" + "Qd" * SLOTS)
_SLOT = struct.Struct("<Qd")
BUCKET_BYTES = _BUCKET.size  # 128: two cache lines
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
    """A 64-bit hash that is the same in every process (``hash()`` is salted per process);
    never 0, which marks an empty slot."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


class LimitTable:
    __slots__ = ("buckets", "buf", "evicted", "full", "locks", "nlocks")

    def __init__(self, buf: memoryview, locks: Sequence[Lock] | None = None) -> None:
        self.buf = buf
        self.buckets = len(buf) // BUCKET_BYTES
        if self.buckets < 1:
            raise ValueError("buffer smaller than one bucket")
        self.locks = list(locks) if locks else []
        self.nlocks = len(self.locks)
        self.evicted = 0  # live entries dropped for a new key (per process)
        self.full = 0  # count acquires let through because a bucket was full of live counts

    def rate(self, key: int, limit: Limit, now: float) -> tuple[int, float, float]:
        """GCRA for ``key``: ``(verdict, tat, wait)`` (see ``policy.ratelimit.gcra``)."""
        b = key % self.buckets
        off = b * BUCKET_BYTES
        lock = self.locks[b % self.nlocks] if self.nlocks else None
        if lock is not None:
            lock.acquire()
        try:
            row = _BUCKET.unpack_from(self.buf, off)
            try:
                i = row.index(key)
            except ValueError:
                i = -1
            if i >= 0 and not i & 1:
                tat = row[i + 1]
            else:
                tats = row[1::2]
                oldest = min(tats)
                i = 2 * tats.index(oldest)
                if oldest > now:
                    self.evicted += 1
                tat = 0.0
            verdict, new, wait = limit.decide(tat, now)
            if verdict != REJECT:
                _SLOT.pack_into(self.buf, off + i * 8, key, new)
            return verdict, new, wait
        finally:
            if lock is not None:
                lock.release()

    def refund(self, key: int, interval: float) -> None:
        """Give back one request a later limit refused (GCRA updates add, so this is exact)."""
        self._add(key, -interval, 0.0)

    def acquire(self, key: int, most: int) -> bool:
        """Count one more in flight for ``key`` unless ``most`` already are."""
        b = key % self.buckets
        off = b * BUCKET_BYTES
        lock = self.locks[b % self.nlocks] if self.nlocks else None
        if lock is not None:
            lock.acquire()
        try:
            row = _BUCKET.unpack_from(self.buf, off)
            try:
                i = row.index(key)
            except ValueError:
                i = -1
            if i >= 0 and not i & 1:
                count = row[i + 1]
            else:
                counts = row[1::2]
                least = min(counts)
                if least > 0:
                    self.full += 1
                    return True  # no room to count: admit rather than refuse an innocent key
                i = 2 * counts.index(least)
                count = 0.0
            if count >= most:
                return False
            _SLOT.pack_into(self.buf, off + i * 8, key, count + 1)
            return True
        finally:
            if lock is not None:
                lock.release()

    def release(self, key: int) -> None:
        self._add(key, -1.0, 0.0)

    def count(self, key: int) -> float:
        row = _BUCKET.unpack_from(self.buf, (key % self.buckets) * BUCKET_BYTES)
        try:
            i = row.index(key)
        except ValueError:
            return 0.0
        return row[i + 1] if not i & 1 else 0.0

    def _add(self, key: int, delta: float, floor: float) -> None:
        b = key % self.buckets
        off = b * BUCKET_BYTES
        lock = self.locks[b % self.nlocks] if self.nlocks else None
        if lock is not None:
            lock.acquire()
        try:
            row = _BUCKET.unpack_from(self.buf, off)
            try:
                i = row.index(key)
            except ValueError:
                return
            if i & 1:
                return
            _SLOT.pack_into(self.buf, off + i * 8, key, max(floor, row[i + 1] + delta))
        finally:
            if lock is not None:
                lock.release()
