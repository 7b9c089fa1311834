"""Limiter tables in shared memory, so a limit is exact across SO_REUSEPORT workers.

The master creates the tables before it spawns the workers (a ``SharedTables`` travels to
each worker with its arguments, pickled as the segment names and the lock handles) and
removes them when it stops. Each worker maps the same pages: a key's state is one slot
that every worker reads and writes under the same stripe lock (runtime.limittable). The
sizes are fixed at start (``[traffic] max_keys``), so a reload cannot grow them and a flood
of keys cannot either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from portico.config.model import Config
from portico.config.traffic import Redis as RedisConfig
from portico.config.traffic import TrafficTable
from portico.dataplane.authio import HttpFetcher, ThreadOffload
from portico.runtime.limittable import STRIPES, LimitTable, table_bytes
from portico.runtime.traffic import RemoteLimiter, TrafficStores

log = logging.getLogger("portico")


class SharedTables:
    """Two shared segments (rate-limit TATs, concurrency counts) and their stripe locks."""

    def __init__(self, config: TrafficTable, ctx: Any = None) -> None:
        ctx = ctx or multiprocessing.get_context("spawn")
        self.config = config
        self.rates = SharedMemory(create=True, size=table_bytes(config.max_keys))
        self.counts = SharedMemory(create=True, size=table_bytes(config.max_concurrency_keys))
        self.locks = [ctx.Lock() for _ in range(STRIPES)]
        self.owner = True
        # A secret like the one Python picks itself (1..2**32-1; 0 would disable hashing's
        # randomisation), shared by the workers only.
        self.seed = str(secrets.randbelow(2**32 - 1) + 1)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "rates": self.rates.name,
            "counts": self.counts.name,
            "locks": self.locks,
            "seed": self.seed,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = state["config"]
        self.rates = SharedMemory(name=state["rates"])
        self.counts = SharedMemory(name=state["counts"])
        self.locks = state["locks"]
        self.seed = state["seed"]
        self.owner = False

    @contextlib.contextmanager
    def seeded(self) -> Iterator[None]:
        """Around spawning a worker: every worker gets the same hash secret, so they agree on
        where a key's slot is (runtime.limittable.key_hash). Only the workers get it; the
        master and the apps it runs keep their own."""
        before = os.environ.get("PYTHONHASHSEED")
        os.environ["PYTHONHASHSEED"] = self.seed
        try:
            yield
        finally:
            if before is None:
                del os.environ["PYTHONHASHSEED"]
            else:
                os.environ["PYTHONHASHSEED"] = before

    def stores(self) -> TrafficStores:
        """This process's view: tables over the shared pages."""
        if os.environ.get("PYTHONHASHSEED") != self.seed:
            # Spawned without ``seeded``: its slots would not be the other workers' slots.
            log.error("worker started without the shared hash seed: limits are per worker")
            return TrafficStores(self.config)
        return TrafficStores(
            self.config,
            rates=LimitTable(self.rates.buf, self.locks),  # type: ignore[arg-type]
            counts=LimitTable(self.counts.buf, self.locks),  # type: ignore[arg-type]
        )

    def clear_counts(self) -> None:
        """Forget every in-flight count (a worker died holding some): limits are briefly
        looser, never stricter, until requests in flight finish."""
        buf = self.counts.buf
        assert buf is not None
        buf[:] = bytes(len(buf))

    def close(self) -> None:
        for shm in (self.rates, self.counts):
            with contextlib.suppress(Exception):
                shm.close()
            if self.owner:
                with contextlib.suppress(Exception):
                    shm.unlink()


def traffic_stores(config: Config, shared: SharedTables | None) -> TrafficStores:
    """Where this process keeps limiter state: the master's shared tables when it runs
    workers, private tables otherwise."""
    stores = shared.stores() if shared is not None else TrafficStores(config.traffic)
    stores.remote_factory = _redis_limiter
    stores.security.fetcher = HttpFetcher()  # JWKS and forward auth (dataplane/authio.py)
    stores.security.offload = ThreadOffload()  # password hashes off the event loop
    return stores


def _redis_limiter(config: RedisConfig) -> RemoteLimiter | None:
    try:
        from portico.dataplane.redislimit import RedisLimiter
    except ImportError:
        log.error(
            "redis: the redis package is not installed (pip install 'portico[redis]'); "
            "limits with store = \"redis\" follow on_error = %s",
            config.on_error,
        )
        return None
    return RedisLimiter(config, asyncio.get_running_loop())
