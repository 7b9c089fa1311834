"""A bounded log of control-plane events (scaling decisions, instance starts and crashes),
kept for the admin API and the dashboard to show."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

# Enough for an operator to read back a busy hour without the log growing forever.
MAX_EVENTS = 1000


@dataclass(frozen=True, slots=True)
class Event:
    at: float  # wall-clock seconds
    source: str  # app or upstream name
    kind: str  # "scale", "start", "ready", "crash", "crash_loop", "drain", "stop", "restart"
    message: str


class EventLog:
    def __init__(self, size: int = MAX_EVENTS) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        # Every event ever added, by (source, kind): the metrics' restart and scale counters
        # (the deque forgets; these must not go back).
        self.counts: dict[tuple[str, str], int] = {}

    def add(self, source: str, kind: str, message: str) -> Event:
        event = Event(time.time(), source, kind, message)
        self.counts[source, kind] = self.counts.get((source, kind), 0) + 1
        self._events.append(event)
        return event

    def recent(self, n: int | None = None, kind: str | None = None) -> list[Event]:
        events = [e for e in self._events if kind is None or e.kind == kind]
        return events if n is None else events[-n:]
