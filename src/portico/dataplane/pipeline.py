"""From a parsed request head to the handler that answers it.

``begin`` is all the connection calls: it builds the request state, finds the route, runs the
route's request stages (any of which may answer locally, or hold the request: a rate
limit's delay, a decision from Redis; ``HeldExchange`` then resumes with ``proceed``),
applies the route's safety rules (allowed Upgrade protocols, body size) and hands the
request to the handler registered for the route's kind. Handlers are registered by the
composition root (``ProxyContext.handlers``), so this module and the connection never
import one.
"""

from __future__ import annotations

from portico.codec.events import RequestHead
from portico.codec.paths import normalize_path
from portico.dataplane import forwarding
from portico.dataplane.exchange import ClientSide, Handler
from portico.dataplane.hold import HeldExchange
from portico.dataplane.wafbody import inspect
from portico.errors import NoRoute, PorticoError, ProtocolError
from portico.runtime.request import RequestState
from portico.runtime.routes import CompiledRoute
from portico.runtime.stages import Hold, LocalReply
from portico.runtime.waf import WafCheck


def begin(conn: ClientSide, head: RequestHead) -> Handler:
    """The handler for this request, not yet started: the connection makes it current
    first, because a handler may finish inside ``start``."""
    ctx = conn.ctx
    snapshot = ctx.snapshot
    target, host = head.target, head.host
    client = conn.client
    bad_target = False
    if target[:1] != b"/" and target != b"*":
        split = forwarding.split_absolute_form(target)
        if split is None:
            bad_target = True
        else:
            target, host = split
    req = RequestState(
        head,
        target,
        host,
        client.ip,
        client.trusted,
        client.proto,
        ctx.loop.time(),
        snapshot.forwarding,
    )
    if bad_target:
        return _local(conn, req, None, error=ProtocolError("bad request target", 400))
    path = req.path
    # The scans are inlined: most paths need no normalizing, and a call costs more than them.
    # (An int needle, and find() for the pairs: ``b"%" in path`` first tries b"%" as an
    # integer and builds a TypeError on every call.)
    if path[:1] == b"/" and (37 in path or path.find(b"/.") >= 0 or path.find(b"//") >= 0):
        normal = normalize_path(path)
        if normal is None:
            return _local(conn, req, None, error=ProtocolError("path climbs above the root", 400))
        # Routes match the normal form; the target goes up byte for byte unless a stage
        # rewrites it (then from the normal form), as nginx's proxy_pass without a URI does.
        req.path = normal
    router = snapshot.router
    route = router.only or router.match(req)
    if route is None:
        return _local(conn, req, None, error=NoRoute("no route matches"))
    req.route = route
    if not route.request_stages:
        # The common case, inlined: no stage, no Upgrade to vet, no body limit of its own.
        if not head.upgrade and route.max_body is None:
            factory = ctx.handlers.get(route.kind)
            if factory is not None:
                return factory(conn, req, route)
        return _handler(conn, req, route)
    return proceed(conn, req, route, 0)


def proceed(conn: ClientSide, req: RequestState, route: CompiledRoute, first: int) -> Handler:
    """Run the route's request stages from ``first`` on, then pick the handler. A stage that
    holds the request gets a ``HeldExchange``, which calls this again after the hold."""
    stages = route.request_stages
    for i in range(first, len(stages)):
        reply = stages[i].on_request(req)
        if reply is not None:
            if type(reply) is Hold:
                after = i if reply.again else i + 1
                return HeldExchange(conn, req, route, after, reply, proceed)
            if type(reply) is WafCheck:  # the WAF's verdict, or its wait for the body
                return inspect(conn, req, route, i + 1, reply, proceed)
            return _local(conn, req, route, reply=reply)  # type: ignore[arg-type]
    return _handler(conn, req, route)


def _handler(conn: ClientSide, req: RequestState, route: CompiledRoute) -> Handler:
    ctx = conn.ctx
    head = req.head
    if head.upgrade and not _upgrade_allowed(head, route):
        # h2c smuggling and friends: the request goes on as a plain request, without Upgrade.
        head.upgrade = False
    max_body = route.max_body
    if max_body is not None and head.content_length is not None and head.content_length > max_body:
        return _local(conn, req, route, error=ProtocolError("body too large for route", 413))
    factory = ctx.handlers.get(route.kind)
    if factory is None:
        return _local(conn, req, route)
    return factory(conn, req, route)


def _local(
    conn: ClientSide,
    req: RequestState,
    route: CompiledRoute | None,
    *,
    reply: LocalReply | None = None,
    error: PorticoError | None = None,
) -> Handler:
    if route is None and req.request_id is None:
        # Answered before any route: the global request-ID stage still names the request.
        stage = conn.ctx.snapshot.router.request_id
        if stage is not None:
            stage.on_request(req)
            req.id_stage = stage
    return conn.ctx.local(conn, req, route, reply, error)


def _upgrade_allowed(head: RequestHead, route: CompiledRoute) -> bool:
    allowed = route.upgrades
    for name, value in head.headers:
        if len(name) == 7 and name.lower() == b"upgrade":
            for proto in value.split(b","):
                token = proto.strip().split(b"/")[0].lower()
                if token and token not in allowed:
                    return False
    return True
