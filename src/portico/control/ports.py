"""Loopback ports for instances, never the same one twice while it may still be in use.

The kernel's "free port" (bind to port 0, read it, close) is only free until someone binds
it; an instance takes a moment to start and bind, and in that moment the kernel may offer
the very same port again. Two instances handed one port would both look ready (the probe
reaches whichever bound it) while one of them fails. So handed-out ports are remembered
until their instance is gone.
"""

from __future__ import annotations

import socket

# Tries before giving up: the kernel's ephemeral range has thousands of ports, so repeats
# are rare; this bounds the loop, it is not expected to be reached.
MAX_TRIES = 100


def kernel_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortAllocator:
    def __init__(self) -> None:
        self._taken: set[int] = set()

    def allocate(self) -> int:
        for _ in range(MAX_TRIES):
            port = kernel_free_port()
            if port not in self._taken:
                self._taken.add(port)
                return port
        raise OSError("no free loopback port found")

    def claim(self, port: int) -> None:
        """Mark a port in use that was not handed out here (an adopted container's)."""
        self._taken.add(port)

    def release(self, port: int) -> None:
        self._taken.discard(port)


# One per process: every provider in it hands out ports from the same machine.
PORTS = PortAllocator()
