"""Compiling the ``routes`` section: config routes -> ``CompiledRoute`` objects and a Router.

Everything that depends only on the config happens here, once per load or reload: regexes,
templates, header rules, prebuilt local replies, each route's view of its upstreams (its
timeouts and retry over the upstream's) and its stage chain in the order safety needs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from portico.config.model import Config
from portico.config.routes import HeaderMatch, Redirect, Route, covers, describe
from portico.config.routes import RequestId as RequestIdConfig
from portico.policy.retry import RetryPolicy
from portico.runtime.auth import SecurityStores, auth_stages
from portico.runtime.compress import DEFAULT_TYPES, Compress, available
from portico.runtime.cors import Cors
from portico.runtime.request import Template
from portico.runtime.routes import (
    KIND_PROXY,
    KIND_REDIRECT,
    KIND_RESPOND,
    KIND_STATIC,
    PATH_EXACT,
    PATH_PREFIX,
    PATH_REGEX,
    CompiledRoute,
    Condition,
    MirrorSpec,
    Router,
    RouteTarget,
    Split,
)
from portico.runtime.stages import (
    EchoRequestId,
    HeaderEdit,
    LocalReply,
    PathRewrite,
    PrefixFix,
    RequestHeaders,
    RequestId,
    ResponseHeaders,
    Stage,
    StickyCookie,
)
from portico.runtime.static import StaticSpec
from portico.runtime.tlsstages import tls_stages
from portico.runtime.traffic import IpRules, TrafficStores, traffic_stages
from portico.runtime.waf import waf_stages

if TYPE_CHECKING:
    from portico.runtime.snapshot import Service


def _condition(name: str, spec: str | HeaderMatch) -> Condition:
    if isinstance(spec, str):
        return Condition(name, exact=spec)
    return Condition(name, present=spec.present, regex=spec.regex)


def _target(route: Route, service: Service, weight: int) -> RouteTarget:
    t = route.timeouts
    retry = service.retry
    if route.retry is not None:
        r = route.retry
        retry = RetryPolicy(
            attempts=r.attempts if r.attempts is not None else retry.attempts,
            retry_on=frozenset(r.on_status) if r.on_status is not None else retry.retry_on,
            per_try_timeout=(
                r.per_try_timeout if r.per_try_timeout is not None else retry.per_try_timeout
            ),
        )
    header = t.response_header if t.response_header is not None else service.response_header_timeout
    return RouteTarget(
        service=service,
        weight=weight,
        connect_timeout=t.connect if t.connect is not None else service.connect_timeout,
        response_header_timeout=header,
        body_idle_timeout=t.body_idle if t.body_idle is not None else service.body_idle_timeout,
        retry=retry,
        deadline=t.deadline if t.deadline is not None else header,
    )


def route_name(route: Route, index: int) -> str:
    return route.name or f"routes[{index}]"


def compile_route(
    route: Route,
    index: int,
    services: Mapping[str, Service],
    request_id: RequestIdConfig | None,
    traffic: Sequence[Stage] = (),
    waf: Sequence[Stage] = (),
    security: SecurityStores | None = None,
    tls: Sequence[Stage] = (),
) -> CompiledRoute:
    if route.upstream or route.split:
        kind = KIND_PROXY
    elif route.redirect is not None:
        kind = KIND_REDIRECT
    elif route.static is not None:
        kind = KIND_STATIC
    else:
        kind = KIND_RESPOND
    cr = CompiledRoute(route_name(route, index), index, kind)
    cr.priority = route.priority
    hosts = [route.host] if isinstance(route.host, str) else list(route.host or ())
    cr.hosts = [h.lower().encode("idna") if not h.startswith("*.") else
                b"*." + h[2:].lower().encode("idna") for h in hosts]
    if cr.hosts:
        exact = [h for h in cr.hosts if not h.startswith(b"*.")]
        cr.host_rank = (0, 0) if exact else (1, -max(len(h) for h in cr.hosts))
    if route.path_exact is not None:
        cr.path_kind, cr.path = PATH_EXACT, route.path_exact.encode()
    elif route.path_regex is not None:
        cr.path_kind, cr.regex = PATH_REGEX, re.compile(route.path_regex)
    else:
        cr.path_kind, cr.path = PATH_PREFIX, (route.path or "/").encode()
    if route.methods is not None:
        cr.methods = frozenset(m.encode() for m in route.methods)
    cr.headers = tuple(_condition(n.lower(), s) for n, s in route.headers.items())
    cr.query = tuple(_condition(n, s) for n, s in route.query.items())
    if route.clients is not None:
        cr.clients = tuple(ipaddress.ip_network(n, strict=False) for n in route.clients)
    cr.max_body = int(route.max_body_bytes) if route.max_body_bytes is not None else None
    cr.host_header = route.host_header.encode("idna") if route.host_header else None
    cr.upgrades = frozenset(p.encode() for p in route.upgrades)
    if route.upstream:
        cr.target = _target(route, services[route.upstream], 1)
    elif route.static is not None:
        cr.static = StaticSpec(route.static, route.path)
        if route.static.fallback_upstream:  # the proxy handler takes what no file matches
            cr.target = _target(route, services[route.static.fallback_upstream], 1)
    elif route.split:
        targets = [_target(route, services[t.upstream], t.weight) for t in route.split]
        cr.split = Split(targets, route.split_sticky)
    if route.mirror is not None:
        m = route.mirror
        cr.mirror = MirrorSpec(
            _target(route, services[m.upstream], 1),
            m.percent,
            m.max_concurrent,
            int(m.max_body_bytes),
            m.timeout,
        )
    if isinstance(route.redirect, Redirect):
        cr.redirect_to = Template(route.redirect.to)
        cr.redirect_status = route.redirect.status
    elif route.redirect == "https":
        cr.redirect_to = Template("https://{hostname}{path}{query}")
        # 308, not 301: a POST must stay a POST (Caddy and Traefik redirect schemes alike).
        cr.redirect_status = 308
    if route.respond is not None:
        r = route.respond
        # The body is a template like every other (the schema checks its names); one without
        # variables is rendered once, here.
        tpl = Template(r.body)
        body = tpl.literal if tpl.literal is not None else b""
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in r.headers.items()]
        if r.body:
            headers.insert(0, (b"Content-Type", r.content_type.encode("latin-1")))
        cr.reply = LocalReply(r.status, headers, body)
        if tpl.literal is None:
            cr.reply_body = tpl
    if request_id is not None:
        cr.request_id_header = request_id.header.encode("latin-1")
    cr.set_stages(_stages(route, request_id, services, traffic, waf, security, tls))
    return cr


def _stages(
    route: Route,
    request_id: RequestIdConfig | None,
    services: Mapping[str, Service],
    traffic: Sequence[Stage] = (),
    waf: Sequence[Stage] = (),
    security: SecurityStores | None = None,
    tls: Sequence[Stage] = (),
) -> list[Stage]:
    """The chain in its fixed order: request ID first (so every later stage and every local
    reply can name it), then traffic control (IP rules, rate and concurrency limits: before
    any work is spent on the request), then path rewriting, then header rules; on the way
    back, the proxy's own cookie, the prefix fixes, the user's header rules, and the
    request ID last."""
    stages: list[Stage] = []
    rid = RequestId(request_id.header) if request_id is not None else None
    if rid is not None:
        stages.append(rid)
    # ACME challenge answers and the HTTPS redirect first (a plain-HTTP request is sent to
    # https:// before any policy spends work on it), then IP rules, CORS preflight, rate
    # limits, authentication, WAF: docs/security.md "Stage order".
    stages.extend(tls)
    ip = [s for s in traffic if isinstance(s, IpRules)]
    stages.extend(ip)
    if route.cors is not None:
        stages.append(Cors(route.cors))
    stages.extend(s for s in traffic if not isinstance(s, IpRules))
    stages.extend(auth_stages(route.auth, security or SecurityStores()))
    stages.extend(waf)  # after traffic and authentication, before any rewrite
    if route.strip_prefix or route.add_prefix or route.rewrite:
        rw = route.rewrite
        regex, to = (rw.regex, rw.to) if rw else (None, None)
        stages.append(PathRewrite(route.strip_prefix, route.add_prefix, regex, to))
    if route.request_headers is not None:
        h = route.request_headers
        stages.append(RequestHeaders(HeaderEdit(h.set, h.add, h.remove)))
    names = [route.upstream] if route.upstream else [t.upstream for t in route.split or ()]
    if any(services[n].sticky is not None for n in names if n):
        stages.append(StickyCookie())
    prefixed = bool(route.strip_prefix or route.add_prefix)
    location = route.rewrite_location if route.rewrite_location is not None else prefixed
    cookie_path = route.cookie_path if route.cookie_path is not None else prefixed
    if location or cookie_path or route.cookie_domain:
        stages.append(
            PrefixFix(
                route.strip_prefix, route.add_prefix, location, cookie_path, route.cookie_domain
            )
        )
    if route.response_headers is not None:
        h = route.response_headers
        stages.append(ResponseHeaders(HeaderEdit(h.set, h.add, h.remove)))
    if route.compress is not None:
        stages.append(_compress(route))
    if request_id is not None:
        stages.append(EchoRequestId(request_id.header))
    return stages


def _fleets(route: Route, services: Mapping[str, Service]) -> list[Service]:
    """The upstreams a route's requests go to (not its mirror): what load shedding watches."""
    names = [route.upstream] if route.upstream else [t.upstream for t in route.split or ()]
    return [services[n] for n in names if n]


def _compress(route: Route) -> Compress:
    c = route.compress
    assert c is not None
    codings = c.encodings or [k for k in ("zstd", "br", "gzip") if available(k)]
    levels = c.levels.model_dump()
    if c.gzip_engine == "isal" and "gzip" not in c.levels.model_fields_set:
        levels["gzip"] = 2  # isal's levels are 0-3; 2 is its fast default
    return Compress(
        codings, levels, int(c.min_size), c.types or DEFAULT_TYPES, c.gzip_engine
    )


def compile_routes(
    config: Config, services: Mapping[str, Service], stores: TrafficStores | None = None
) -> Router:
    rid_cfg = config.request_id
    rid = rid_cfg if rid_cfg is not None and rid_cfg.enabled else None
    stores = stores if stores is not None else TrafficStores(config.traffic)
    effective = config.effective_routes()
    # Rule sets compile here, once per config (a broken rule raises WafRulesError).
    wafs = waf_stages(
        {i: (r.waf, f"routes[{i}].waf") for i, r in enumerate(effective) if r.waf is not None}
    )
    routes = [
        compile_route(
            r,
            i,
            services,
            rid,
            traffic_stages(
                config,
                r,
                route_name(r, i),
                stores,
                config.redis,
                _fleets(r, services),
                r.shed_priority,
            ),
            wafs.get(i, ()),
            stores.security,
            tls_stages(config, r),
        )
        for i, r in enumerate(effective)
    ]
    return Router(routes, RequestId(rid.header) if rid is not None else None)


def shadowed(config: Config) -> list[str]:
    """Warnings for routes that can never match: a route of higher precedence matches every
    request they match. Uses the compiled order, so it agrees with the data plane."""
    from portico.runtime.snapshot import compile_config  # the snapshot imports this module

    routes = config.effective_routes()
    ranked = compile_config(config).router.routes
    warnings = []
    for pos, later in enumerate(ranked):
        for earlier in ranked[:pos]:
            if covers(routes[earlier.index], routes[later.index]):
                warnings.append(
                    f"routes[{later.index}]: never matched: {earlier.name} "
                    f"({describe(routes[earlier.index])}) comes first and matches all it does"
                )
                break
    return warnings
