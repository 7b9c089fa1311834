"""Stopping: the first SIGTERM/Ctrl-C drains, a second one stops at once.

Theory of operation. The first signal sets ``graceful``: listeners close, requests held for a
cold start are answered 503 at once (no instance is coming), in-flight requests get up to
``server.shutdown_grace``, and the log says so, then counts down every few seconds naming
what is left. A second signal sets ``immediate``: the wait ends, open connections are reset,
and app instances are killed (SIGKILL to their process groups), so nothing is left behind.

The gateway calls these functions from its stop path; they hold no state of their own beyond
the two events, so the process model around them can change freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Protocol

from portico.runtime.snapshot import Snapshot

log = logging.getLogger("portico")

# Seconds between "still waiting" lines while draining.
COUNTDOWN_EVERY = 5.0


class Apps(Protocol):
    """What stopping needs of the orchestrator."""

    async def stop(self) -> None: ...
    def kill(self) -> None: ...


class StopSignals:
    """SIGTERM and SIGINT: the first one asks for a graceful stop, the second for an
    immediate one."""

    def __init__(
        self,
        what: Callable[[], str],
        grace: float,
        on_immediate: Callable[[], None] | None = None,
    ) -> None:
        self.graceful = asyncio.Event()
        self.immediate = asyncio.Event()
        self._what = what  # what a graceful stop waits for, e.g. "3 open connections"
        self._grace = grace
        self._on_immediate = on_immediate

    def install(self, loop: asyncio.AbstractEventLoop, *, worker: bool = False) -> None:
        """Handle SIGTERM and SIGINT. A worker ignores SIGINT: Ctrl-C reaches the whole
        process group, and its master forwards it as SIGTERM (counting it twice would turn
        the first Ctrl-C into an immediate stop)."""
        loop.add_signal_handler(signal.SIGTERM, self.received, signal.SIGTERM)
        if worker:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            loop.add_signal_handler(signal.SIGINT, self.received, signal.SIGINT)

    def received(self, sig: int = signal.SIGTERM) -> None:
        name = signal.Signals(sig).name
        if not self.graceful.is_set():
            self.graceful.set()
            log.info(
                "%s: stopping gracefully: waiting up to %gs for %s; %s again to stop at once",
                name,
                self._grace,
                self._what(),
                "Ctrl-C" if sig == signal.SIGINT else "SIGTERM",
            )
        elif not self.immediate.is_set():
            self.immediate.set()
            log.warning("%s again: stopping at once", name)
            if self._on_immediate is not None:
                self._on_immediate()


def release_held(snapshot: Snapshot) -> int:
    """Answer every request held for a cold start (503, no instance is coming); returns how
    many there were."""
    n = 0
    for service in snapshot.services.values():
        waiters, service.waiters = service.waiters, []
        for wake in waiters:
            wake()
        n += len(waiters)
    return n


async def wait_drained(
    left: Callable[[], int],
    grace: float,
    immediate: asyncio.Event,
    what: str = "open connection(s)",
) -> bool:
    """Wait until ``left()`` is 0 (True), ``grace`` passes or ``immediate`` is set (False),
    logging a countdown."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    next_note = loop.time() + COUNTDOWN_EVERY
    while left() and not immediate.is_set():
        now = loop.time()
        if now >= deadline:
            return False
        if now >= next_note:
            log.info("stopping: %d %s left, at most %.0fs more", left(), what, deadline - now)
            next_note = now + COUNTDOWN_EVERY
        with contextlib.suppress(TimeoutError):
            # Poll rather than wire a completion event through every connection: rare path.
            await asyncio.wait_for(immediate.wait(), min(0.05, deadline - now))
    return not left()


async def stop_apps(apps: Apps, immediate: asyncio.Event) -> None:
    """Drain and stop the app instances; if ``immediate`` is (or gets) set, kill them."""
    if immediate.is_set():
        apps.kill()
    else:
        log.info("stopping app instances (drain, SIGTERM, then SIGKILL); signal again to kill")
    stopping = asyncio.ensure_future(apps.stop())
    waiting = asyncio.ensure_future(immediate.wait())
    try:
        await asyncio.wait({stopping, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            apps.kill()  # the supervisors see their instances gone and finish quickly
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopping), 5.0)
    finally:
        waiting.cancel()
        if not stopping.done():
            stopping.cancel()
        apps.kill()  # whatever is left, whatever happened above
