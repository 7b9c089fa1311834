"""The exchange contract between a client connection and whatever answers a request.

The client connection parses requests and enforces client timeouts; a *handler* (proxy,
local reply, later static files and internal pages) answers one request. They meet only
through the two protocols below, so the connection never imports a handler and a new
handler kind needs no change to the connection:

* ``ClientSide``: what a handler may do to the client connection (write, cork, pause
  reading for a reason, say it has finished, abort);
* ``Handler``: what the connection tells the handler (body data, end of body, flow control,
  the client leaving, a timer firing).

Every handler ends through ``finish``: the one place where a request's outcome is recorded
(the access log and the metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from portico.codec.events import RequestHead
from portico.runtime.request import RequestState

if TYPE_CHECKING:
    import asyncio

    from portico.dataplane.context import ProxyContext
    from portico.dataplane.forwarding import ClientInfo
    from portico.dataplane.timers import Deadline
    from portico.errors import PorticoError
    from portico.runtime.routes import CompiledRoute
    from portico.runtime.stages import LocalReply


class ClientSide(Protocol):
    """The client connection as a handler sees it."""

    ctx: ProxyContext
    client: ClientInfo
    up_timer: Deadline  # one re-armable timer per connection, for the handler's waits
    tunnel: bool
    # For handlers that write around the transport (sendfile): its socket and buffer size.
    transport: asyncio.Transport | None

    def write(self, data: bytes) -> None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...
    def abort(self) -> None: ...
    def pause_for_upstream(self) -> None: ...
    def resume_for_upstream(self) -> None: ...
    def pause_for_buffer(self) -> None: ...
    def resume_for_buffer(self) -> None: ...
    def exchange_finished(self, keep_alive: bool) -> None: ...
    def detach(self) -> None: ...
    def take_upgrade_leftover(self) -> bytes: ...


class Handler(Protocol):
    """One request being answered. The connection drives it with these calls only."""

    req: RequestState
    head: RequestHead
    request_done: bool
    response_started: bool
    client_eof: bool

    @property
    def holding(self) -> bool:
        """Waiting for capacity (a cold start, a stage's hold): a client that leaves ends it."""
        ...

    def start(self) -> None: ...
    def on_request_data(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...
    def tunnel_from_client(self, data: bytes) -> None: ...
    def client_paused(self) -> None: ...
    def client_resumed(self) -> None: ...
    def client_gone(self) -> None: ...
    def on_upstream_timeout(self) -> None: ...


HandlerFactory = Callable[[ClientSide, RequestState, "CompiledRoute"], Handler]
# The local handler also takes the reply a stage produced, or the error to answer with.
LocalFactory = Callable[
    [ClientSide, RequestState, "CompiledRoute | None", "LocalReply | None", "PorticoError | None"],
    Handler,
]


def request_id_field(req: RequestState) -> tuple[bytes, bytes] | None:
    """The request ID header for a response Portico writes itself (an error), if any."""
    rid = req.request_id
    if rid is None:
        return None
    route = req.route
    if route is not None and route.request_id_header is not None:
        return route.request_id_header, rid
    # Answered before a route matched: the global stage made the ID, under its own name.
    stage = req.id_stage
    return (stage.name, rid) if stage is not None else None


def finish(conn: ClientSide, req: RequestState) -> None:
    """Record a finished (or abandoned) request: the single finish path."""
    ctx = conn.ctx
    finishers = req.finishers
    if finishers is not None:
        req.finishers = None
        for release in finishers:
            release()
    log = ctx.access_log
    metrics = ctx.metrics
    if log is None and metrics is None:
        return
    duration = ctx.loop.time() - req.started_at
    if metrics is not None:
        metrics.count(req, duration)
    if log is not None:
        log.log_request(conn.client.ip, req, duration)
