"""Mirroring: a copy of a request sent to a shadow upstream whose answer is dropped.

The copy never touches the client's path: it runs as its own task on its own connection
(``Connection: close``), bounded in number (``max_concurrent``, counted per worker) and in time
(``timeout``), and any failure is swallowed. Bodies are copied only when their length is
known and at most ``max_body_bytes`` (held in memory until the request ends); other requests
with a body are not mirrored.
"""

from __future__ import annotations

import asyncio
import contextlib

from portico.dataplane import forwarding
from portico.dataplane.exchange import ClientSide
from portico.runtime.request import RequestState
from portico.runtime.routes import MirrorSpec

# Tasks are referenced here until they end so the loop does not lose them.
_tasks: set[asyncio.Task[None]] = set()


class MirrorCopy:
    """The body of a mirrored request, collected as it streams to the real upstream."""

    __slots__ = ("chunks", "conn", "head_bytes", "spec")

    def __init__(self, conn: ClientSide, head_bytes: bytes, spec: MirrorSpec) -> None:
        self.conn = conn
        self.head_bytes = head_bytes
        self.spec = spec
        self.chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)

    def end(self) -> None:
        _launch(self.conn, self.spec, self.head_bytes + b"".join(self.chunks))

    def drop(self) -> None:
        """The request did not complete: nothing is mirrored."""
        self.spec.in_flight -= 1
        self.chunks = []


def start_mirror(conn: ClientSide, req: RequestState, spec: MirrorSpec) -> MirrorCopy | None:
    """Start mirroring ``req``; returns a copy to feed when the body is still to come."""
    head = req.head
    if head.upgrade:
        return None
    if head.framing != "none" and (
        head.framing != "length" or (head.content_length or 0) > spec.max_body
    ):
        return None
    service = spec.target.service
    endpoint = service.pick(conn.ctx.loop.time())  # type: ignore[attr-defined]
    if endpoint is None:
        return None
    raw = forwarding.request_head(
        head,
        req.target,
        req.host,
        conn.client,
        conn.ctx.snapshot.forwarding,
        service.host_override,  # type: ignore[attr-defined]
        endpoint.authority,
    )
    head_bytes = raw[:-2] + b"Connection: close\r\n\r\n"
    spec.in_flight += 1
    if head.framing == "none":
        _launch(conn, spec, head_bytes, endpoint.address)
        return None
    return MirrorCopy(conn, head_bytes, spec)


def _launch(
    conn: ClientSide,
    spec: MirrorSpec,
    data: bytes,
    address: tuple[str, int] | None = None,
) -> None:
    if address is None:
        endpoint = spec.target.service.pick(conn.ctx.loop.time())  # type: ignore[attr-defined]
        if endpoint is None:
            spec.in_flight -= 1
            return
        address = endpoint.address
    task = conn.ctx.loop.create_task(_send(spec, address, data))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _send(spec: MirrorSpec, address: tuple[str, int], data: bytes) -> None:
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(spec.timeout):
            reader, writer = await asyncio.open_connection(*address)
            writer.write(data)
            await writer.drain()
            while await reader.read(65536):
                pass  # the shadow's answer is read and dropped
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        spec.in_flight -= 1
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
