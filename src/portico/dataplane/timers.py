"""A cheap, re-armable deadline for timeouts that move on every byte.

Re-arming an asyncio timer on every read would create and cancel a TimerHandle per chunk.
Instead ``Deadline.set`` only records the new expiry; the single scheduled handle, when it
fires early, re-schedules itself for the recorded time. Moving a deadline later (the common
case: more progress) therefore costs one ``loop.time()`` call and no allocation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    __slots__ = ("_callback", "_handle", "_loop", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._when: float | None = None

    def set(self, delay: float) -> None:
        when = self._loop.time() + delay
        self._when = when
        handle = self._handle
        if handle is None:
            self._handle = self._loop.call_at(when, self._fire)
        elif handle.when() > when:
            handle.cancel()
            self._handle = self._loop.call_at(when, self._fire)

    def clear(self) -> None:
        self._when = None

    def cancel(self) -> None:
        """Clear and drop the scheduled handle (on close, so nothing keeps the owner alive)."""
        self._when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def armed(self) -> bool:
        return self._when is not None

    def _fire(self) -> None:
        self._handle = None
        when = self._when
        if when is None:
            return
        if self._loop.time() < when:
            self._handle = self._loop.call_at(when, self._fire)
            return
        self._when = None
        self._callback()
