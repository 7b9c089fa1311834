"""Rate limits shared by several gateways, kept in Redis.

Theory of operation. A request's limits are decided in one Lua script call (atomic: GCRA on
every key of the request, none charged when one refuses, the clock is Redis's own ``TIME`` so
gateways need not agree on the time). Requests never wait for each other: every decision
asked for during one event-loop iteration goes out as one pipeline on a connection of a
small pool, and several pipelines may be in flight at once, so a round trip costs each
request its latency, never a place in a queue.

Failure. A batch that fails or takes longer than ``redis.timeout`` answers every request in
it with None, which the stage turns into admit (``on_error = "open"``) or 503 (``closed``).
The first failure of an episode is logged, later ones are not; for ``RETRY_AFTER`` seconds
requests do not even try (a Redis that is down costs nothing per request), then the next
batch probes it again, and the first success ends the episode (logged too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from portico.config.traffic import Redis as RedisConfig
from portico.policy.ratelimit import Limit
from portico.runtime.limittable import stable_hash
from portico.runtime.traffic import Verdict

log = logging.getLogger("portico.ratelimit")

# Seconds between tries while Redis is failing: short enough to recover quickly, long enough
# that a dead Redis is not asked once per request.
RETRY_AFTER = 1.0
# Pipelines in flight at once; beyond it a batch waits for a connection (within the timeout).
MAX_CONNECTIONS = 8
# Decisions per pipeline: bounds one round trip's size under a flood.
MAX_BATCH = 256

# KEYS: one per limit. ARGV: interval, tolerance, max_delay per key. Returns, per key,
# verdict, tat - now, wait (as strings: Lua numbers would be truncated to integers).
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
local rejected = false
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 2])
  local tolerance = tonumber(ARGV[3 * i - 1])
  local max_delay = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  local base = math.max(tat, now)
  local allow_at = base - tolerance
  local verdict, new, wait = 0, base + interval, 0
  if allow_at > now + 1e-9 then
    wait = allow_at - now
    if wait > max_delay then
      verdict, new, rejected = 2, tat, true
    else
      verdict = 1
    end
  end
  out[i] = {verdict, new, wait}
end
local res = {}
for i = 1, #KEYS do
  local v = out[i]
  if not rejected then
    local ttl = math.ceil((v[2] - now) * 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.6f', v[2]), 'PX', ttl)
  end
  res[#res + 1] = tostring(v[1])
  res[#res + 1] = string.format('%.6f', v[2] - now)
  res[#res + 1] = string.format('%.6f', v[3])
end
return res
"""

Done = Callable[[list[Verdict] | None], None]


class RedisLimiter:
    """The ``RemoteLimiter`` of runtime.traffic over redis-py's asyncio client."""

    def __init__(self, config: RedisConfig, loop: asyncio.AbstractEventLoop) -> None:
        import redis.asyncio as aioredis  # the optional dependency: portico[redis]

        self.config = config
        self.loop = loop
        self.prefix = config.prefix.encode()
        pool = aioredis.BlockingConnectionPool.from_url(
            config.url,
            max_connections=MAX_CONNECTIONS,
            timeout=config.timeout,
            socket_connect_timeout=config.timeout,
        )
        self.client: Any = aioredis.Redis(connection_pool=pool)
        self.script = self.client.register_script(GCRA_SCRIPT)
        self.pending: list[tuple[list[bytes], list[str], Done]] = []
        self.scheduled = False
        self.failing_since: float | None = None
        self.retry_at = 0.0
        self.tasks: set[asyncio.Task[None]] = set()
        self.failures = 0  # batches failed, for metrics and tests

    def check(self, keys: Sequence[bytes], limits: Sequence[Limit], done: Done) -> None:
        if self.failing_since is not None and self.loop.time() < self.retry_at:
            done(None)
            return
        names = [self.prefix + b"%016x" % stable_hash(k) for k in keys]
        args: list[str] = []
        for lim in limits:
            args += [repr(lim.interval), repr(lim.tolerance), repr(lim.max_delay)]
        self.pending.append((names, args, done))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.scheduled = False
        while self.pending:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            task = self.loop.create_task(self._send(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[tuple[list[bytes], list[str], Done]]) -> None:
        try:
            async with asyncio.timeout(self.config.timeout):
                pipe = self.client.pipeline(transaction=False)
                for names, args, _ in batch:
                    await self.script(keys=names, args=args, client=pipe)  # queues it
                results = await pipe.execute()
        except Exception as exc:  # any failure of the store is answered the same way
            self._failed(exc)
            for _, _, done in batch:
                done(None)
            return
        if self.failing_since is not None:
            log.warning(
                "redis %s is back after %.1fs: shared rate limits enforced again",
                self.config.url,
                self.loop.time() - self.failing_since,
            )
            self.failing_since = None
        for (_, _, done), flat in zip(batch, results, strict=True):
            verdicts: list[Verdict] = [
                (int(flat[i]), float(flat[i + 1]), float(flat[i + 2]))
                for i in range(0, len(flat), 3)
            ]
            done(verdicts)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        now = self.loop.time()
        self.retry_at = now + RETRY_AFTER
        if self.failing_since is None:
            self.failing_since = now
            reason = "timed out" if isinstance(exc, TimeoutError) else f"{exc!r}"
            mode = "admitting" if self.config.on_error == "open" else "refusing (503)"
            log.warning(
                "redis %s failed (%s): %s requests of shared rate limits until it is back",
                self.config.url,
                reason,
                mode,
            )

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self.client.aclose()


def unreachable(config: RedisConfig) -> str | None:
    """Why Redis cannot be reached now, or None (for ``portico check``; blocking)."""
    try:
        import redis
    except ImportError:
        return "the redis package is not installed (pip install 'portico[redis]')"
    client = redis.Redis.from_url(
        config.url, socket_timeout=1.0, socket_connect_timeout=1.0
    )
    try:
        client.ping()
    except Exception as exc:
        return f"cannot reach {config.url}: {exc}"
    finally:
        client.close()
    return None
