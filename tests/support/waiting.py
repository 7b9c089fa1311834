"""Waiting on conditions with a deadline, never on bare sleeps."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.02,
    message: str = "",
) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Raises AssertionError naming ``message`` (or the predicate) if ``timeout`` seconds pass
    first. An exception raised by the predicate propagates at once: that is how a caller fails
    fast, e.g. when the process it waits for has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout:g}s waiting for: {what}")
        time.sleep(interval)


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True if a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 5.0, host: str = "127.0.0.1") -> None:
    """Wait until host:port accepts TCP connections."""
    wait_until(
        lambda: port_accepts(port, host),
        timeout=timeout,
        interval=0.05,
        message=f"{host}:{port} to accept connections",
    )
