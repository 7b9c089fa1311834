"""The local handler: answers a request from the gateway itself (``respond``, ``redirect``,
and every error found before a handler could take the request: no route, bad path, body
too large for the route)."""

from __future__ import annotations

from portico.codec.events import RequestHead
from portico.dataplane.clock import date_line
from portico.dataplane.exchange import ClientSide, finish, request_id_field
from portico.dataplane.responses import response_for
from portico.errors import PorticoError
from portico.runtime.request import RequestState
from portico.runtime.routes import KIND_REDIRECT, CompiledRoute, redirect_reply
from portico.runtime.stages import LocalReply

# A body this large, or of unknown length, is not read and thrown away after a local reply:
# the connection closes instead (nginx discards bodies too, but bounded by time).
DISCARD_LIMIT = 65536


class LocalExchange:
    holding = False  # answers at once: never waits for capacity
    __slots__ = (
        "client_eof",
        "conn",
        "done",
        "error",
        "head",
        "reply",
        "req",
        "request_done",
        "response_started",
        "route",
    )

    def __init__(
        self,
        conn: ClientSide,
        req: RequestState,
        route: CompiledRoute | None,
        reply: LocalReply | None = None,
        error: PorticoError | None = None,
    ) -> None:
        self.conn = conn
        self.req = req
        self.head: RequestHead = req.head
        self.route = route
        self.reply = reply
        self.error = error
        self.request_done = req.head.framing == "none"
        self.response_started = False
        self.client_eof = False
        self.done = False

    def __repr__(self) -> str:
        return f"<LocalExchange {self.req.head.method.decode()} {self.req.status}>"

    def start(self) -> None:
        conn = self.conn
        head = self.head
        req = self.req
        keep = (
            head.keep_alive
            and not conn.ctx.closing
            and (
                head.framing == "none"
                or (head.content_length is not None and head.content_length <= DISCARD_LIMIT)
            )
        )
        if self.error is not None:
            data = response_for(self.error, close=not keep, request_id=request_id_field(req))
            req.status = self.error.status
        else:
            reply = self.reply
            if reply is not None:
                req.refused = reply.refusal
            route = self.route
            if reply is None and route is not None:
                reply = route.reply if route.kind != KIND_REDIRECT else redirect_reply(route, req)
            assert reply is not None
            if route is not None and route.reply_body is not None:
                body = route.reply_body.render(req, in_head=False)
                reply = LocalReply(reply.status, reply.headers, body)
            if route is not None and route.response_stages:
                headers = list(reply.headers)
                for stage in route.response_stages:
                    stage.on_response(req, reply.status, headers)
                reply = LocalReply(reply.status, headers, reply.body)
            req.status = reply.status
            data = reply.encode(not keep, head_only=head.method == b"HEAD", date=date_line())
            if head.version == b"1.0" and keep:
                data = data.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n", 1)
        self.response_started = True
        req.sent_bytes = len(data) - data.index(b"\r\n\r\n") - 4
        conn.write(data)
        self.done = True
        finish(conn, req)
        conn.exchange_finished(keep)

    def on_request_data(self, data: bytes) -> None:
        return None  # the answer does not depend on the body: it is dropped

    def on_request_end(self) -> None:
        self.request_done = True

    def tunnel_from_client(self, data: bytes) -> None:
        return None

    def client_paused(self) -> None:
        return None

    def client_resumed(self) -> None:
        return None

    def client_gone(self) -> None:
        if not self.done:
            self.done = True
            if not self.req.status:
                self.req.status = 499
            finish(self.conn, self.req)

    def on_upstream_timeout(self) -> None:
        return None
