"""Waiting for an endpoint to drain: no new requests reach it; in-flight ones finish."""

from __future__ import annotations

import asyncio

from portico.runtime.endpoint import Endpoint

# How often the wait looks at the in-flight count.
POLL = 0.02


async def wait_drained(endpoint: Endpoint, timeout: float, settle: float = 0.0) -> bool:
    """Wait until ``endpoint.in_flight`` is 0 (True) or ``timeout`` passes (False).

    ``settle``: seconds to wait at least. With several workers the master learns of their
    in-flight counts, and they of the draining flag, a report later; until a report has
    come back since the flag went out, a zero proves nothing.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    settled = start + min(settle, timeout)
    while loop.time() < deadline:
        if endpoint.in_flight <= 0 and loop.time() >= settled:
            return True
        await asyncio.sleep(POLL)
    return endpoint.in_flight <= 0
