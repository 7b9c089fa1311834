"""Listening sockets, made here so workers can share a port through SO_REUSEPORT."""

from __future__ import annotations

import contextlib
import errno
import socket

import psutil

from portico.config.types import parse_hostport
from portico.errors import StartupError


def bind_socket(address: str, *, reuse_port: bool, backlog: int) -> socket.socket:
    """A listening TCP socket for ``host:port``. Raises StartupError naming the address and,
    when the port is taken and the holder can be found, the process holding it."""
    host, port = parse_hostport(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why += port_holder(port)
        elif exc.errno == errno.EACCES and port < 1024:
            why += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        raise StartupError(f"cannot listen on {address}: {why}") from None
    return sock


def port_holder(port: int) -> str:
    """`` (held by process PID NAME)`` for the process listening on ``port``, or ``""`` when
    it cannot be told (another user's process, without root)."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return " (held by another user's process)"
                pid = conn.pid
                try:
                    proc = psutil.Process(pid)
                    parent = proc.parent()
                    if "--multiprocessing-fork" in proc.cmdline() and parent is not None:
                        proc = parent  # a worker: name its master, the one to stop
                        pid = proc.pid
                    name = " ".join(proc.cmdline())[:80] or proc.name()
                except psutil.Error:
                    name = "?"
                return f" (held by process {pid}: {name})"
    return ""


# Below this many queued connections a burst of new clients overflows the listen queue; the
# kernel then drops SYNs, and a dropped SYN is retried only after 1 s, then 3 s.
SMALL_LISTEN_QUEUE = 4096


def listen_queue_warning(backlog: int) -> str | None:
    """A warning when the kernel caps the listen queue well below ``backlog``, or None."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            cap = int(f.read())
    except (OSError, ValueError):
        return None
    if cap >= min(backlog, SMALL_LISTEN_QUEUE):
        return None
    return (
        f"net.core.somaxconn is {cap}: bursts of more than {cap} new connections get SYNs"
        f" dropped (retried after 1 s); raise it: sysctl -w net.core.somaxconn={backlog}"
    )
