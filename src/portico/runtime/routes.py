"""The route table: every route compiled once per config into a matcher and a stage chain.

Precedence (documented in docs/routing.md), highest first:
1. ``priority`` (higher first; default 0);
2. host: exact beats wildcard (longer suffix first) beats none;
3. path: ``path_exact`` beats ``path_regex`` beats ``path`` prefixes (longer first);
4. more conditions (methods, headers, query, clients) beat fewer;
5. the order in the file.
Sorting gives each route a rank; matching then looks only at routes whose host and path can
match (dictionary lookups by exact host, wildcard suffix, exact path and prefix per length)
and returns the best-ranked one whose remaining conditions hold. A table of thousands of
host or path routes therefore costs a few lookups per request, not a scan.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from urllib.parse import parse_qsl

from portico.codec.events import RequestHead
from portico.runtime.request import RequestState, Template
from portico.runtime.stages import LocalReply, RequestId, Stage, hooks
from portico.runtime.static import StaticSpec

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PATH_EXACT, PATH_REGEX, PATH_PREFIX = range(3)


class Condition:
    """One header or query condition: exact value, present/absent, or regex search."""

    __slots__ = ("exact", "name", "present", "regex")

    def __init__(
        self,
        name: str,
        exact: str | None = None,
        present: bool | None = None,
        regex: str | None = None,
    ) -> None:
        self.name = name
        self.exact = exact
        self.present = present
        self.regex = re.compile(regex) if regex is not None else None

    def holds(self, values: list[str]) -> bool:
        if self.exact is not None:
            return self.exact in values
        if self.present is not None:
            return bool(values) is self.present
        rx = self.regex
        return rx is not None and any(rx.search(v) for v in values)


class RouteTarget:
    """A service as one route uses it: the route's timeouts and retry over the upstream's."""

    __slots__ = (
        "body_idle_timeout",
        "connect_timeout",
        "deadline",
        "first_try_timeout",
        "response_header_timeout",
        "retry",
        "service",
        "weight",
    )

    def __init__(
        self,
        service: object,
        weight: int,
        connect_timeout: float,
        response_header_timeout: float,
        body_idle_timeout: float,
        retry: object,
        deadline: float,
    ) -> None:
        # ``service`` is a runtime.snapshot.Service and ``retry`` a policy RetryPolicy; typed
        # loosely here so this module does not import the snapshot (which imports it).
        self.service = service
        self.weight = weight
        self.connect_timeout = connect_timeout
        self.response_header_timeout = response_header_timeout
        self.body_idle_timeout = body_idle_timeout
        self.retry = retry
        self.deadline = deadline
        # A first try starts as the deadline starts, so its timeout needs no clock reading.
        per_try = getattr(retry, "per_try_timeout", None) or response_header_timeout
        self.first_try_timeout: float = min(per_try, deadline)


class Split:
    """Weighted choice among targets: smooth weighted round robin (exact shares), or by a
    hash of the client address when the split is sticky."""

    __slots__ = ("current", "sticky", "targets", "total")

    def __init__(self, targets: Sequence[RouteTarget], sticky: bool) -> None:
        self.targets = [t for t in targets if t.weight > 0]
        self.total = sum(t.weight for t in self.targets)
        self.current = [0] * len(self.targets)
        self.sticky = sticky

    def pick(self, client_ip: str) -> RouteTarget:
        targets = self.targets
        if self.sticky:
            point = _stable_hash(client_ip) % self.total
            for t in targets:
                if point < t.weight:
                    return t
                point -= t.weight
            return targets[-1]
        cur = self.current
        best = 0
        for i, t in enumerate(targets):
            cur[i] += t.weight
            if cur[i] > cur[best]:
                best = i
        cur[best] -= self.total
        return targets[best]


def _stable_hash(text: str) -> int:
    # FNV-1a: stable across processes and restarts, unlike hash(), so every worker agrees.
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


class MirrorSpec:
    """Where and how much to mirror; ``take`` spreads the share evenly (no randomness)."""

    __slots__ = ("acc", "in_flight", "max_body", "max_concurrent", "percent", "target", "timeout")

    def __init__(
        self, target: RouteTarget, percent: float, max_concurrent: int, max_body: int,
        timeout: float,
    ) -> None:
        self.target = target
        self.percent = percent
        self.max_concurrent = max_concurrent
        self.max_body = max_body
        self.timeout = timeout
        self.acc = 0.0
        self.in_flight = 0

    def take(self) -> bool:
        self.acc += self.percent
        if self.acc >= 100.0:
            self.acc -= 100.0
            return self.in_flight < self.max_concurrent
        return False


KIND_PROXY, KIND_REDIRECT, KIND_RESPOND = "proxy", "redirect", "respond"
KIND_STATIC = "static"


class CompiledRoute:
    """One route: matcher fields, handler kind and data, and its stage chain split by hook."""

    __slots__ = (
        "bare",
        "body_stages",
        "clients",
        "headers",
        "host_header",
        "host_rank",
        "hosts",
        "index",
        "kind",
        "max_body",
        "methods",
        "mirror",
        "name",
        "path",
        "path_kind",
        "priority",
        "query",
        "rank",
        "redirect_status",
        "redirect_to",
        "regex",
        "reply",
        "reply_body",
        "request_id_header",
        "request_stages",
        "response_stages",
        "split",
        "static",
        "target",
        "upgrades",
    )

    def __init__(self, name: str, index: int, kind: str) -> None:
        self.name = name
        self.index = index
        self.kind = kind
        self.priority = 0
        self.rank = 0
        self.hosts: list[bytes] = []  # b"example.com" or b"*.example.com"; empty = any
        self.host_rank: tuple[int, int] = (2, 0)
        self.path_kind = PATH_PREFIX
        self.path = b"/"
        self.regex: re.Pattern[str] | None = None
        self.methods: frozenset[bytes] | None = None
        self.headers: tuple[Condition, ...] = ()
        self.query: tuple[Condition, ...] = ()
        self.clients: tuple[IPNetwork, ...] | None = None
        self.target: RouteTarget | None = None  # proxy to one upstream
        self.split: Split | None = None  # or a weighted choice
        self.mirror: MirrorSpec | None = None
        self.redirect_to: Template | None = None
        self.redirect_status = 302
        self.reply: LocalReply | None = None
        self.reply_body: Template | None = None  # a respond body that names variables
        self.static: StaticSpec | None = None  # files, for a static route
        self.max_body: int | None = None
        self.host_header: bytes | None = None  # Host sent upstream, over the upstream's
        self.upgrades: frozenset[bytes] = frozenset((b"websocket",))
        self.request_id_header: bytes | None = None  # set when request IDs are on
        self.request_stages: tuple[Stage, ...] = ()
        self.response_stages: tuple[Stage, ...] = ()
        self.body_stages: tuple[Stage, ...] = ()
        self.bare = False  # set by the Router: nothing to check beyond host and path

    def __repr__(self) -> str:
        return f"<Route {self.name} {self.kind} rank={self.rank}>"

    def set_stages(self, stages: Sequence[Stage]) -> None:
        self.request_stages, self.response_stages, self.body_stages = hooks(stages)

    def specificity(self) -> tuple[int, ...]:
        conditions = (
            (self.methods is not None)
            + len(self.headers)
            + len(self.query)
            + (self.clients is not None)
        )
        path_rank = (0, -len(self.path)) if self.path_kind == PATH_EXACT else (
            (1, 0) if self.path_kind == PATH_REGEX else (2, -len(self.path))
        )
        return (-self.priority, *self.host_rank, *path_rank, -conditions, self.index)

    def rest_matches(self, req: RequestState, head: RequestHead) -> bool:
        """Everything but host and path (already filtered by the index), regex included."""
        if self.methods is not None and head.method not in self.methods:
            return False
        rx = self.regex
        m = None
        if rx is not None:
            m = rx.search(req.path.decode("latin-1"))
            if m is None:
                return False
        for cond in self.headers:
            lname = cond.name.encode("latin-1")
            values = [v.decode("latin-1") for n, v in head.headers if n.lower() == lname]
            if not cond.holds(values):
                return False
        if self.query:
            pairs = parse_qsl(req.query[1:].decode("latin-1"), keep_blank_values=True)
            for cond in self.query:
                if not cond.holds([v for k, v in pairs if k == cond.name]):
                    return False
        if self.clients is not None:
            try:
                addr = ipaddress.ip_address(req.client_ip)
            except ValueError:
                return False
            if not any(addr in net for net in self.clients):
                return False
        if m is not None:
            caps = {k: v for k, v in m.groupdict().items() if v is not None}
            caps.update({str(i): g for i, g in enumerate(m.groups(), 1) if g is not None})
            req.captures = caps
        return True


class PathIndex:
    """Ranks of the routes that may match a path, by exact path and by prefix length."""

    __slots__ = ("exact", "lengths", "prefixes", "regex")

    def __init__(self) -> None:
        self.exact: dict[bytes, list[int]] = {}
        self.prefixes: dict[int, dict[bytes, list[int]]] = {}
        self.lengths: tuple[int, ...] = ()
        self.regex: list[int] = []

    def add(self, route: CompiledRoute) -> None:
        if route.path_kind == PATH_EXACT:
            self.exact.setdefault(route.path, []).append(route.rank)
        elif route.path_kind == PATH_REGEX:
            self.regex.append(route.rank)
        else:
            by_len = self.prefixes.setdefault(len(route.path), {})
            by_len.setdefault(route.path, []).append(route.rank)
            self.lengths = tuple(sorted(self.prefixes))

    def collect(self, path: bytes, out: list[int]) -> None:
        hit = self.exact.get(path)
        if hit:
            out += hit
        n = len(path)
        prefixes = self.prefixes
        for length in self.lengths:
            if length > n:
                break
            hit = prefixes[length].get(path[:length])
            if hit:
                out += hit
        if self.regex:
            out += self.regex


class Router:
    """Finds the route for a request. Built once per config; read-only afterwards."""

    __slots__ = (
        "any_host",
        "by_any_host",
        "by_host",
        "by_suffix",
        "for_any_host",
        "only",
        "request_id",
        "routes",
        "suffix_lengths",
    )

    def __init__(self, routes: list[CompiledRoute], request_id: RequestId | None = None) -> None:
        # The request-ID stage for answers given before a route matched (404, 400).
        self.request_id = request_id
        routes.sort(key=CompiledRoute.specificity)
        for rank, route in enumerate(routes):
            route.rank = rank
        self.routes = routes
        self.by_host: dict[bytes, PathIndex] = {}
        self.by_suffix: dict[bytes, PathIndex] = {}
        self.any_host = PathIndex()
        for route in routes:
            if not route.hosts:
                self.any_host.add(route)
            for host in route.hosts:
                if host.startswith(b"*."):
                    self.by_suffix.setdefault(host[1:], PathIndex()).add(route)
                else:
                    self.by_host.setdefault(host, PathIndex()).add(route)
        self.suffix_lengths = bool(self.by_suffix)
        # What a request need not compute: its host when no route names one, the any-host
        # index when every route names a host, the remaining conditions of a bare route.
        self.by_any_host = bool(self.by_host or self.by_suffix)
        any_host = self.any_host
        self.for_any_host = bool(any_host.exact or any_host.prefixes or any_host.regex)
        for route in routes:
            route.bare = (
                route.methods is None
                and route.regex is None
                and not route.headers
                and not route.query
                and route.clients is None
            )
        # One catch-all route with no conditions: nothing to look up per request.
        self.only: CompiledRoute | None = None
        if len(routes) == 1:
            r = routes[0]
            if (
                not r.hosts
                and r.path_kind == PATH_PREFIX
                and r.path == b"/"
                and r.methods is None
                and not r.headers
                and not r.query
                and r.clients is None
            ):
                self.only = r

    def match(self, req: RequestState) -> CompiledRoute | None:
        only = self.only
        if only is not None:
            return only
        path = req.path
        ranks: list[int] = []
        host = req.host
        if host and self.by_any_host:
            host = _hostname(host)
            index = self.by_host.get(host)
            if index is not None:
                index.collect(path, ranks)
            if self.suffix_lengths:
                dot = host.find(b".")
                while dot >= 0:
                    index = self.by_suffix.get(host[dot:])
                    if index is not None:
                        index.collect(path, ranks)
                    dot = host.find(b".", dot + 1)
        if self.for_any_host:
            self.any_host.collect(path, ranks)
        if not ranks:
            return None
        if len(ranks) > 1:
            ranks.sort()
        routes = self.routes
        head = req.head
        for rank in ranks:
            route = routes[rank]
            if route.bare or route.rest_matches(req, head):
                return route
        return None


def _hostname(host: bytes) -> bytes:
    """The lower-cased host (not empty) without its port; ``[v6]`` keeps its brackets."""
    if host[0] == 0x5B:  # "["
        return host[: host.find(b"]") + 1].lower()
    # An int needle is searched for directly; ``b":" in host`` would first try b":" as an
    # integer, and build and drop a TypeError, on every request.
    if 0x3A in host:  # ":"
        host = host[: host.rfind(b":")]
    return host.lower()


def redirect_reply(route: CompiledRoute, req: RequestState) -> LocalReply:
    """The redirect a ``redirect`` route answers with. The query is kept unless the template
    places it itself (``{query}``) or gives one (``?``), as nginx's ``rewrite`` does."""
    tpl = route.redirect_to
    assert tpl is not None
    location = tpl.render(req)
    if req.query and b"?" not in location and "{query}" not in tpl.source:
        location += req.query
    return LocalReply(
        route.redirect_status,
        [(b"Location", location), (b"Content-Type", b"text/plain; charset=utf-8")],
        b"",
    )
