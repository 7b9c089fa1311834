"""Per-request state every stage and handler reads, and the templates rendered from it.

``RequestState`` is the "ctx" of the request pipeline: created once per request by the
client connection, filled in by the router (route, captures) and by stages (target, request
ID), read by the handler and by the one ``finish`` path. It holds values, not I/O, so stages
that use it stay pure and unit-testable.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from portico.codec.events import RequestHead

if TYPE_CHECKING:
    from portico.runtime.routes import CompiledRoute
    from portico.runtime.stages import RequestId as RequestIdStage

Headers = list[tuple[bytes, bytes]]


class Trust(Protocol):
    """Who may speak for a client (the forwarding policy's trusted networks)."""

    def trusts(self, ip: str) -> bool: ...


class RequestState:
    """One request as the gateway sees it (the access log always shows ``head.target``)."""

    __slots__ = (
        "_client_ip",
        "captures",
        "client_port",
        "finishers",
        "head",
        "host",
        "id_stage",
        "limit_headers",
        "now",
        "path",
        "peer_ip",
        "peer_trusted",
        "query",
        "received_bytes",
        "refused",
        "request_id",
        "route",
        "scheme",
        "sent_bytes",
        "service",
        "set_cookie",
        "started_at",
        "status",
        "target",
        "tries",
        "trusts",
        "upstream",
        "upstream_time",
        "waf",
    )

    def __init__(
        self,
        head: RequestHead,
        target: bytes,
        host: bytes | None,
        peer_ip: str,
        peer_trusted: bool,
        scheme: bytes,
        started_at: float,
        trusts: Trust | None = None,
    ) -> None:
        self.head = head
        self.target = target  # what the upstream will see: rewritten by stages
        self.host = host  # Host header (or absolute-form authority), port included
        q = target.find(b"?")
        self.path = target if q < 0 else target[:q]
        self.query = b"" if q < 0 else target[q:]  # with its '?'
        self.peer_ip = peer_ip
        self.peer_trusted = peer_trusted
        self.trusts = trusts
        self.scheme = scheme
        self.started_at = started_at
        # When stages run: started_at, then the time a held request resumed (runtime.stages).
        self.now = started_at
        self.route: CompiledRoute | None = None
        self.captures: dict[str, str] | None = None
        self.request_id: bytes | None = None
        self.id_stage: RequestIdStage | None = None  # the global one, before any route
        self.status = 0
        self.sent_bytes = 0
        self.upstream: str | None = None  # label of the endpoint that answered
        # For metrics and the access log: the upstream's name, the tries made, the seconds
        # from sending the request to the answer's head (last try), request body bytes read,
        # and why a stage refused the request ("rate_limit", "shed"...).
        self.service: str | None = None
        self.tries = 0
        self.upstream_time: float | None = None
        self.received_bytes = 0
        self.refused: str | None = None
        self.set_cookie: bytes | None = None  # a Set-Cookie value the handler wants sent
        self._client_ip: str | None = None
        # Traffic control: callbacks run once when the request finishes (a concurrency slot
        # to give back), and the RateLimit headers its response carries.
        self.finishers: list[Callable[[], None]] | None = None
        self.limit_headers: Headers | None = None
        # The WAF's transaction, kept for the response phases (waf.inspect_response only).
        self.waf: object = None

    @property
    def client_ip(self) -> str:
        """The client's address after trusted-proxy resolution (X-Forwarded-For)."""
        ip = self._client_ip
        if ip is None:
            ip = self._client_ip = resolve_client_ip(
                self.peer_ip, self.peer_trusted, self.head.headers, self.trusts
            )
        return ip

    @property
    def hostname(self) -> bytes:
        host = self.host or b""
        if host.startswith(b"["):
            return host[: host.find(b"]") + 1]
        return host.rpartition(b":")[0] if 58 in host else host  # 58 = ":" (int needle)

    def set_path(self, path: bytes) -> None:
        self.path = path
        self.target = path + self.query


def resolve_client_ip(peer: str, trusted: bool, headers: Headers, trusts: Trust | None) -> str:
    """The rightmost X-Forwarded-For address not in a trusted network (nginx's real_ip with
    ``real_ip_recursive on``); the peer itself when the peer is not trusted."""
    if not trusted or trusts is None:
        return peer
    chain: list[str] = []
    for name, value in headers:
        if len(name) == 15 and name.lower() == b"x-forwarded-for":
            chain += [p.strip().decode("latin-1") for p in value.split(b",") if p.strip()]
    for candidate in reversed(chain):
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            return peer  # garbage in the chain: trust nothing beyond the peer
        if not trusts.trusts(candidate):
            return candidate
    return chain[0] if chain else peer


# --- templates ---------------------------------------------------------------------------

_PART = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def _var(name: str) -> Callable[[RequestState], bytes]:
    if name == "scheme":
        return lambda r: r.scheme
    if name == "host":
        return lambda r: r.host or b""
    if name == "hostname":
        return lambda r: r.hostname
    if name == "path":
        return lambda r: r.path
    if name == "query":
        return lambda r: r.query
    if name == "client_ip":
        return lambda r: r.client_ip.encode("ascii")
    if name == "request_id":
        return lambda r: r.request_id or b""
    if name == "route":
        return lambda r: r.route.name.encode() if r.route is not None else b""
    if name == "method":
        return lambda r: r.head.method

    def capture(r: RequestState) -> bytes:
        caps = r.captures
        value = caps.get(name) if caps else None
        return value.encode("latin-1") if value else b""

    return capture


class Template:
    """A ``{var}`` template compiled once; rendering joins literal bytes and variables."""

    __slots__ = ("literal", "parts", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        parts: list[bytes | Callable[[RequestState], bytes]] = []
        pos = 0
        for m in _PART.finditer(source):
            if m.start() > pos:
                parts.append(source[pos : m.start()].encode("utf-8"))
            token = m.group(0)
            if token == "{{":
                parts.append(b"{")
            elif token == "}}":
                parts.append(b"}")
            else:
                parts.append(_var(m.group(1)))
            pos = m.end()
        if pos < len(source):
            parts.append(source[pos:].encode("utf-8"))
        # Adjacent literals are merged so a template without variables renders as one bytes.
        merged: list[bytes | Callable[[RequestState], bytes]] = []
        for p in parts:
            if isinstance(p, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += p
            else:
                merged.append(p)
        self.parts: Sequence[bytes | Callable[[RequestState], bytes]] = tuple(merged)
        self.literal: bytes | None = (
            merged[0] if len(merged) == 1 and isinstance(merged[0], bytes) else
            (b"" if not merged else None)
        )

    def render(self, req: RequestState, *, in_head: bool = True) -> bytes:
        """The rendered bytes; ``in_head=False`` for a body, whose newlines are its own."""
        if self.literal is not None:
            return self.literal
        out = b"".join(p if isinstance(p, bytes) else p(req) for p in self.parts)
        # Variables come from a validated head, but nothing may ever split a head in two.
        if in_head and (13 in out or 10 in out or 0 in out):  # CR, LF, NUL as int needles
            out = out.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
        return out

    def __repr__(self) -> str:
        return f"Template({self.source!r})"
