"""Free TCP ports on the loopback interface, picked by the kernel."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago.

    The socket is closed before returning, so another process could in theory take the port
    before the caller binds it; the fixtures that use it fail fast (the process exits) rather
    than hang if that ever happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
