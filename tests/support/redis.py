"""``RedisServer``: a real ``redis-server`` on a free 127.0.0.1 port, owned by a test.

Nothing is persisted (no RDB, no AOF) and it can be killed, paused (SIGSTOP), resumed and
started again on the same port, which is what the fault tests of shared rate limits need.
``unavailable()`` says why no redis-server can run here (the tests then skip with it).
"""

from __future__ import annotations

import shutil
import signal
from typing import Self

from tests.support.lifecycle import StartStop
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess
from tests.support.waiting import port_accepts, wait_until


def unavailable() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server; scripts/test.sh does)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install 'portico[redis]')"
    return None


class RedisServer(StartStop):
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: ManagedProcess | None = None
        self.paused = False

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} {self.process!r}>"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> Self:
        argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
        ]
        self.process = ManagedProcess(argv, name="redis").start()
        wait_until(lambda: port_accepts(self.port), timeout, message="redis-server to listen")
        return self

    def kill(self) -> None:
        """SIGKILL: gone at once, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing is answered."""
        assert self.process is not None
        self.process.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.process is not None:
            if self.paused:
                self.resume()
            self.process.stop(timeout=5)
            self.process = None
