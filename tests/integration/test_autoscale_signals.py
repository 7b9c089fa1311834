"""The autoscaler's ``rps``, ``p95_latency`` and ``cpu`` signals end to end: ``portico serve``
runs a small app, a bounded load drives one signal over its target, and the fleet grows.

The in-flight signal is covered in test_orchestration. Each test here also checks the value the
autoscaler logged against what the client saw, so a signal computed on the wrong scale (per
interval instead of per second, say) fails even when it happens to cross the target.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration import test_instance_stop
from tests.integration.test_instance_stop import ServeFactory, config_for, holding_app
from tests.integration.test_orchestration import Fleet, get

pytestmark = pytest.mark.timeout(90)

serve = test_instance_stop.serve  # the same fixture: portico serve, nothing left behind

# Decide every 0.2 s, scale up on the first sample over the target, never scale down here.
RULE = {
    "interval": 0.2,
    "scale_up_window": 0,
    "scale_down_window": 60,
    "max_step": 4,
    "cooldown": 0,
    "idle_timeout": 60,
}
# Longest a signal may take to cross its target under load on a busy machine.
SCALE_WITHIN = 15.0


@dataclass
class PacedLoad:
    """``threads`` clients each sending GET ``target`` at most ``per_thread_rate`` times a
    second, until stopped, ``max_requests`` in all or ``max_seconds``."""

    port: int
    target: str
    threads: int = 1
    per_thread_rate: float = 1000.0
    max_requests: int = 3000
    max_seconds: float = 20.0
    times: list[float] = field(default_factory=list)  # when each 200 arrived (monotonic)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> PacedLoad:
        self.started = time.monotonic()
        deadline = self.started + self.max_seconds
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, args=(deadline,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(30)

    def _run(self, deadline: float) -> None:
        gap = 1.0 / self.per_thread_rate
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if len(self.times) + len(self.failures) >= self.max_requests:
                    return
            sent = time.monotonic()
            try:
                reply = get(self.port, self.target)
            except Exception as e:
                with self._lock:
                    self.failures.append(f"{type(e).__name__}: {e}")
                continue
            with self._lock:
                if reply.status == 200:
                    self.times.append(time.monotonic())
                else:
                    self.failures.append(f"{reply.status} {reply.body[:80]!r}")
            self._stop.wait(max(0.0, sent + gap - time.monotonic()))

    def rate(self) -> float:
        """Answers per second since the start."""
        with self._lock:
            return len(self.times) / max(1e-9, time.monotonic() - self.started)


def autoscaled(tmp_path: Path, metric: str, target: float) -> dict[str, Any]:
    app = holding_app(
        tmp_path, min=1, max=2, autoscale={**RULE, "metric": metric, "target": target}
    )
    return config_for(app, balancer="round_robin")


def scale_up(f: Fleet, label: str, target: float) -> float:
    """Wait for the 1 -> 2 decision on ``label``; the observed value it logged."""
    [m] = f.wait_log(
        rf"scale default 1 -> 2: {re.escape(label)} (\S+) > target {target:g}$",
        timeout=SCALE_WITHIN,
    )
    f.wait_ready(2)
    return float(m.group(1))


def test_rps_signal_scales_up_on_requests_per_second(serve: ServeFactory, tmp_path: Path) -> None:
    f = serve(autoscaled(tmp_path, "rps", 10))
    f.wait_ready(1)
    # One client at most 40 requests a second: well over the target of 10 per second, while
    # one interval (0.2 s) never holds more than about 8 of them.
    with PacedLoad(f.port, "/whoami", per_thread_rate=40.0) as load:
        observed = scale_up(f, "req/s/instance", 10)
        rate = load.rate()
    assert load.failures == []
    assert 10 < observed <= 60, observed
    assert rate / 3 <= observed <= rate * 3, f"logged {observed} req/s, client saw {rate:.1f}"


def test_p95_latency_signal_scales_up_on_slow_answers(serve: ServeFactory, tmp_path: Path) -> None:
    f = serve(autoscaled(tmp_path, "p95_latency", 0.1))
    f.wait_ready(1)
    with PacedLoad(f.port, "/sleep/0.3", threads=2, max_requests=200) as load:
        observed = scale_up(f, "p95 latency s", 0.1)
    assert load.failures == []
    assert 0.25 <= observed < 2.0, f"logged p95 {observed}s for answers of 0.3s"


def test_cpu_signal_scales_up_on_a_busy_instance(serve: ServeFactory, tmp_path: Path) -> None:
    f = serve(autoscaled(tmp_path, "cpu", 25))
    f.wait_ready(1)
    # Two clients asking for 0.1 s of CPU each, back to back: the instance is busy all along.
    with PacedLoad(f.port, "/burn/0.1", threads=2, max_requests=300) as load:
        observed = scale_up(f, "CPU %/instance", 25)
    assert load.failures == []
    assert 25 < observed <= 200, observed
