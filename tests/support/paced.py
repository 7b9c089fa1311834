"""A paced load generator: requests at fixed times over keep-alive connections.

Rate-limit tests need to know exactly what was offered: ``paced`` opens ``connections``
sockets (spread round robin over ``ports``, so SO_REUSEPORT spreads them over workers and a
list of gateways shares the load), sends one GET every ``1 / rate`` seconds in all for
``seconds``, and counts the statuses. It runs its own asyncio loop in the calling thread;
every connection is closed before it returns, and the whole run is bounded in time.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

# Seconds to wait for one response before counting the request as failed.
RESPONSE_TIMEOUT = 5.0


@dataclass
class PacedResult:
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    sent: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # of 200 responses
    sends: list[float] = field(default_factory=list)  # when each request was written
    outcomes: list[tuple[float, int, float]] = field(default_factory=list)  # sent, status, s

    def largest_gap(self) -> float:
        """The longest time without a request: a stalled client lets a bucket refill."""
        times = sorted(self.sends)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    @property
    def elapsed(self) -> float:
        return self.last_at - self.first_at


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def _run(
    ports: Sequence[int],
    rate: float,
    seconds: float,
    connections: int,
    target: str,
    headers: Sequence[tuple[str, str]],
    warmup: str | None,
) -> PacedResult:
    result = PacedResult()
    extra = "".join(f"{n}: {v}\r\n" for n, v in headers)
    request = f"GET {target} HTTP/1.1\r\nHost: paced\r\n{extra}\r\n".encode()
    total = int(rate * seconds) + 1
    streams = [
        await asyncio.open_connection("127.0.0.1", ports[i % len(ports)])
        for i in range(connections)
    ]
    if warmup is not None:
        # One request per connection first, so no worker's first (slow) request stalls the
        # paced run: a stalled client lets a rate-limit bucket fill, and that is lost.
        for _, writer in streams:
            writer.write(f"GET {warmup} HTTP/1.1\r\nHost: paced\r\n\r\n".encode())
        for reader, _ in streams:
            await asyncio.wait_for(_read_response(reader), RESPONSE_TIMEOUT)
    start = time.monotonic() + 0.1

    async def client(index: int) -> None:
        reader, writer = streams[index]
        for n in range(index, total, connections):
            at = start + n / rate
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic()
            if n == 0:
                result.first_at = sent
            result.last_at = max(result.last_at, sent)
            result.sent += 1
            result.sends.append(sent)
            writer.write(request)
            try:
                status = await asyncio.wait_for(_read_response(reader), RESPONSE_TIMEOUT)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
                result.failures.append(f"request {n}: {e!r}")
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", ports[index % len(ports)]
                )
                streams[index] = (reader, writer)
                continue
            result.statuses[status] += 1
            result.outcomes.append((sent, status, time.monotonic() - sent))
            if status == 200:
                result.latencies.append(time.monotonic() - sent)

    try:
        await asyncio.wait_for(
            asyncio.gather(*(client(i) for i in range(connections))),
            seconds + RESPONSE_TIMEOUT * 2 + 5,
        )
    finally:
        for _, writer in streams:
            writer.close()
    return result


def paced(
    ports: int | Sequence[int],
    rate: float,
    seconds: float,
    *,
    connections: int = 8,
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    warmup: str | None = None,
) -> PacedResult:
    """``warmup``: a target each connection requests once before the paced run."""
    port_list = [ports] if isinstance(ports, int) else list(ports)
    return asyncio.run(_run(port_list, rate, seconds, connections, target, headers, warmup))
