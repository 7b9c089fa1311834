"""The routes schema: what a request must look like, and what the gateway does with it.

A route has matchers (host, path, methods, headers, query, client networks), optional stages
(rewrites, header rules) and exactly one handler: ``upstream`` or ``split`` (proxy),
``redirect`` or ``respond``. Everything a template may name is checked here, so a typo in
``{rest}`` is refused by ``portico check`` rather than discovered by a user at run time.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from portico.config.security import Auth, Cors
from portico.config.tls import Hsts, hsts_flag
from portico.config.traffic import (
    CONCURRENCY,
    IP_ALLOW,
    IP_DENY,
    RATE_LIMIT,
    AllowList,
    Concurrencies,
    RateLimits,
)
from portico.config.types import (
    _TOKEN,
    Network,
    NonNegSeconds,
    PositiveSeconds,
    Size,
    Strict,
)
from portico.config.waf import Waf, waf_flag

#: Variables every template may use; regex captures of the route's path_regex come on top.
TEMPLATE_VARS = frozenset(
    {"scheme", "host", "hostname", "path", "query", "client_ip", "request_id", "route", "method"}
)

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")

# Header names a rule may not touch: framing and connection management belong to the codec,
# forwarding headers to the ``forwarding`` section (rules would let one route forge them).
_RESERVED_RESPONSE = frozenset(
    {
        "connection",
        "content-length",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "keep-alive",
        "proxy-connection",
    }
)
_FORWARDING = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded", "via"}
)
_RESERVED_REQUEST = _RESERVED_RESPONSE | _FORWARDING | {"expect"}


def template_names(template: str) -> list[str]:
    """The ``{names}`` a template uses. ``{{`` and ``}}`` are literal braces."""
    return _PLACEHOLDER.findall(template.replace("{{", "").replace("}}", ""))


def check_template(template: str, captures: frozenset[str]) -> None:
    """Raise ValueError naming the first unknown variable or capture."""
    stripped = template.replace("{{", "").replace("}}", "")
    if stripped.count("{") != stripped.count("}"):
        raise ValueError(f"{template!r}: unbalanced braces (write {{{{ or }}}} for a literal)")
    for name in template_names(template):
        if name not in TEMPLATE_VARS and name not in captures:
            known = sorted(TEMPLATE_VARS | captures)
            raise ValueError(
                f"{template!r}: unknown variable {{{name}}} (known: {', '.join(known)})"
            )


def _check_value_bytes(value: str, key: str | None = None) -> str:
    if any(c in value for c in "\r\n\0"):
        # "key: reason" makes the loader report the key's own path.
        raise ValueError(f"{key + ': ' if key else ''}a header value may not contain CR, LF or NUL")
    return value


def _check_header_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a header name (an HTTP token)")
    return name


class HeaderMatch(Strict):
    """A header or query parameter condition other than an exact value."""

    present: bool | None = Field(None, description="true: must be present; false: must be absent")
    regex: str | None = Field(None, description="the value must match (search) this regex")

    @model_validator(mode="after")
    def _one(self) -> HeaderMatch:
        if (self.present is None) == (self.regex is None):
            raise ValueError("give one of present or regex")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"invalid regex {self.regex!r}: {e}") from None
        return self


class HeaderRules(Strict):
    """Edits applied to a head: remove first, then set (replace), then add (append)."""

    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)

    @field_validator("set", "add")
    @classmethod
    def _pairs(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            _check_header_name(name)
            _check_value_bytes(value, name)
        return v

    @field_validator("remove")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_header_name(name)
        return v

    def names(self) -> list[str]:
        return [*self.set, *self.add, *self.remove]


class Redirect(Strict):
    to: str = Field(description="target template: {scheme} {host} {path} {query}, captures")
    status: Literal[301, 302, 303, 307, 308] = 302

    @field_validator("to")
    @classmethod
    def _value(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return _check_value_bytes(v)


class Respond(Strict):
    status: int = Field(200, ge=200, le=599)
    body: str = ""
    content_type: str = Field("text/plain; charset=utf-8")
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("headers")
    @classmethod
    def _pairs(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            _check_header_name(name)
            _check_value_bytes(value, name)
            if name.lower() in _RESERVED_RESPONSE or name.lower() == "date":
                raise ValueError(f"{name}: Portico writes this header itself")
        return v

    @field_validator("content_type")
    @classmethod
    def _ctype(cls, v: str) -> str:
        return _check_value_bytes(v)

    @model_validator(mode="after")
    def _bodiless(self) -> Respond:
        if self.status in (204, 304) and self.body:
            raise ValueError(f"body: a {self.status} answer has no body")
        return self


class Rewrite(Strict):
    regex: str = Field(description="applied to the path (no query); first match is replaced")
    to: str = Field(description="replacement template: {1} or {name} for captures, variables")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex {v!r}: {e}") from None
        return v


class SplitTarget(Strict):
    upstream: str
    weight: int = Field(ge=0, le=10000)


class Mirror(Strict):
    upstream: str
    percent: float = Field(100.0, gt=0, le=100, description="share of requests mirrored")
    max_concurrent: int = Field(16, ge=1, description="mirrored requests in flight at most")
    max_body_bytes: Size = Field(
        65536,  # type: ignore[assignment]
        description="requests with a larger body are not mirrored (the copy is held)"
    )
    timeout: PositiveSeconds = Field(10.0, description="a mirrored request is abandoned after")


class RouteTimeouts(Strict):
    """Per-route overrides of the upstream's timeouts, and the request deadline."""

    connect: PositiveSeconds | None = None
    response_header: PositiveSeconds | None = None
    body_idle: PositiveSeconds | None = None
    deadline: PositiveSeconds | None = Field(
        None,
        description="time from the end of the request to a response head, across every "
        "try (504); unset = the upstream's response_header timeout",
    )


class RouteRetry(Strict):
    attempts: int | None = Field(None, ge=1, le=10)
    on_status: list[int] | None = None
    per_try_timeout: PositiveSeconds | None = None

    @field_validator("on_status")
    @classmethod
    def _statuses(cls, v: list[int] | None) -> list[int] | None:
        for status in v or ():
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return v


Coding = Literal["zstd", "br", "gzip"]


class Static(Strict):
    """Files from a directory (``static = { root = "/srv/www" }``): see docs/static-files.md."""

    root: str | None = Field(
        None, description="directory the request path (after strip_prefix/rewrite) is found in"
    )
    alias: str | None = Field(
        None, description="directory the route's path prefix stands for (nginx alias)"
    )
    index: list[str] = Field(
        default_factory=lambda: ["index.html"], description="files tried for a directory"
    )
    fallback: str | None = Field(
        None, description="file under the directory sent when nothing matches (single-page apps)"
    )
    fallback_upstream: str | None = Field(
        None, description="upstream a request goes to when no file matches (try_files @app)"
    )
    listing: bool = Field(False, description="list a directory that has no index file")
    hidden: bool = Field(False, description="serve names starting with '.' (404 by default)")
    symlinks_outside: bool = Field(
        False, description="follow symlinks that lead out of the directory (404 by default)"
    )
    precompressed: bool | list[Coding] = Field(
        False, description="send file.br / file.zst / file.gz when the client accepts them"
    )
    cache_control: dict[str, str] = Field(
        default_factory=dict, description="glob of the path -> Cache-Control value, first wins"
    )
    charset: str = Field("utf-8", description="charset named on text types; '' for none")
    types: dict[str, str] = Field(
        default_factory=dict, description="file extension ('.ext') -> Content-Type"
    )

    @field_validator("root", "alias")
    @classmethod
    def _directory(cls, v: str | None) -> str | None:
        import os

        if v is not None:
            if not os.path.isabs(v):
                raise ValueError(f"{v!r}: must be an absolute path")
            if not os.path.exists(v):
                raise ValueError(f"{v!r} does not exist")
            if not os.path.isdir(v):
                raise ValueError(f"{v!r} is not a directory")
        return v

    @field_validator("index")
    @classmethod
    def _index_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
                raise ValueError(f"{name!r}: an index is a file name, without '/'")
        return v

    @field_validator("fallback")
    @classmethod
    def _fallback(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or ".." in v.split("/") or "\0" in v):
            raise ValueError(f"{v!r}: a path under the directory, starting with '/'")
        return v

    @field_validator("cache_control")
    @classmethod
    def _cache_values(cls, v: dict[str, str]) -> dict[str, str]:
        for value in v.values():
            _check_value_bytes(value)
        return v

    @field_validator("types")
    @classmethod
    def _types(cls, v: dict[str, str]) -> dict[str, str]:
        for ext, ctype in v.items():
            if not ext.startswith(".") or "/" in ext:
                raise ValueError(f"{ext!r}: an extension starting with '.'")
            _check_value_bytes(ctype)
        return v

    @field_validator("charset")
    @classmethod
    def _charset(cls, v: str) -> str:
        if v and not _TOKEN.match(v):
            raise ValueError(f"{v!r} is not a charset name")
        return v

    @model_validator(mode="after")
    def _one_directory(self) -> Static:
        if (self.root is None) == (self.alias is None):
            raise ValueError("give one of root or alias")
        return self

    def directory(self) -> str:
        d = self.root if self.root is not None else self.alias
        assert d is not None
        return d

    def codings(self) -> list[str]:
        if self.precompressed is True:
            return ["br", "zstd", "gzip"]
        return list(self.precompressed) if self.precompressed else []


class CompressLevels(Strict):
    gzip: int = Field(6, ge=0, le=9, description="zlib 1-9; isal 0-3 (default 2 with isal)")
    br: int = Field(4, ge=0, le=11)
    zstd: int = Field(3, ge=1, le=19)


class Compress(Strict):
    """Response compression (``compress = true`` or a table): see docs/static-files.md."""

    encodings: list[Coding] | None = Field(
        None, description="codings offered, server preference first; unset = zstd, br, gzip "
        "(those installed)"
    )
    levels: CompressLevels = Field(default_factory=CompressLevels)
    min_size: Size = Field(
        512,  # type: ignore[assignment]
        description="responses with a smaller Content-Length are sent as they are",
    )
    types: list[str] | None = Field(
        None, description="media types compressed (globs: text/*); unset = text-like types"
    )
    gzip_engine: Literal["zlib", "isal"] = Field(
        "zlib", description="isal: ISA-L (pip install isal), much faster gzip; levels 0-3"
    )

    @field_validator("encodings")
    @classmethod
    def _installed(cls, v: list[str] | None) -> list[str] | None:
        import importlib.util

        modules = {"br": "brotli", "zstd": "zstandard", "gzip": "zlib"}
        for coding in v or ():
            if importlib.util.find_spec(modules[coding]) is None:
                raise ValueError(
                    f"{coding}: the {modules[coding]} package is not installed "
                    "(pip install 'portico[compress]')"
                )
        if v is not None and not v:
            raise ValueError("name at least one coding (or set compress = false)")
        return v

    @field_validator("types")
    @classmethod
    def _media(cls, v: list[str] | None) -> list[str] | None:
        for t in v or ():
            if "/" not in t or any(c in t for c in " ;,\r\n"):
                raise ValueError(f"{t!r} is not a media type (type/subtype, globs allowed)")
        return v

    @model_validator(mode="after")
    def _engine(self) -> Compress:
        if self.gzip_engine == "isal":
            import importlib.util

            if importlib.util.find_spec("isal") is None:
                raise ValueError(
                    "gzip_engine: the isal package is not installed (pip install isal)"
                )
            if "gzip" in self.levels.model_fields_set and self.levels.gzip > 3:
                raise ValueError(f"levels.gzip: isal's levels are 0-3, got {self.levels.gzip}")
        elif self.levels.gzip < 1:
            raise ValueError(f"levels.gzip: zlib's levels are 1-9, got {self.levels.gzip}")
        return self


class Route(Strict):
    name: str | None = Field(None, description="shown in logs and {route}; default routes[i]")
    priority: int = Field(0, description="higher wins before specificity is considered")
    shed_priority: int = Field(
        0, description="load shedding: > 0 never shed, < 0 shed first (upstream shed)"
    )
    # --- matchers ---
    host: str | list[str] | None = Field(
        None, description="Host to match, exact or *.example.com (port ignored); unset = any"
    )
    path: str | None = Field(
        None, description="path prefix to match ('/' unless another path key is given)"
    )
    path_exact: str | None = Field(None, description="the path must equal this")
    path_regex: str | None = Field(None, description="regex the path must match; named captures")
    methods: list[str] | None = None
    headers: dict[str, str | HeaderMatch] = Field(default_factory=dict)
    query: dict[str, str | HeaderMatch] = Field(default_factory=dict)
    clients: list[Network] | None = Field(
        None, description="client networks (after trusted-proxy resolution)"
    )
    # --- handler (exactly one) ---
    upstream: str | None = None
    split: list[SplitTarget] | None = None
    redirect: Redirect | Literal["https"] | None = None
    respond: Respond | None = None
    static: Static | None = None
    # --- stages and proxy settings ---
    split_sticky: bool = Field(False, description="a client keeps its share of a split")
    compress: Compress | None = Field(
        None, description="compress responses the client accepts compressed; true = defaults"
    )
    mirror: Mirror | None = None
    strip_prefix: str | None = None
    add_prefix: str | None = None
    rewrite: Rewrite | None = None
    host_header: str | None = Field(None, description="Host sent upstream for this route")
    request_headers: HeaderRules | None = None
    response_headers: HeaderRules | None = None
    rewrite_location: bool | None = Field(
        None, description="fix Location of a prefix-changed app; default on with prefixes"
    )
    cookie_path: bool | None = Field(
        None, description="fix Set-Cookie Path of a prefix-changed app; default on with prefixes"
    )
    cookie_domain: dict[str, str] = Field(
        default_factory=dict, description="Set-Cookie Domain from -> to"
    )
    timeouts: RouteTimeouts = Field(default_factory=RouteTimeouts)
    retry: RouteRetry | None = None
    max_body_bytes: Size | None = Field(None, description="largest request body here (413)")
    # --- traffic control (config.traffic; the top level has the same four keys) ---
    rate_limit: RateLimits = Field(default_factory=list, description=RATE_LIMIT)
    concurrency: Concurrencies = Field(default_factory=list, description=CONCURRENCY)
    ip_allow: AllowList = Field(None, description=IP_ALLOW)
    ip_deny: list[Network] = Field(default_factory=list, description=IP_DENY)
    # --- security (config.security, config.waf; docs/security.md) ---
    auth: Auth | None = Field(None, description="basic, jwt or forward authentication")
    cors: Cors | None = Field(None, description="CORS, preflights answered by the gateway")
    waf: Waf | None = Field(None, description="ModSecurity + OWASP CRS; true = defaults")

    hsts: Hsts | None = Field(
        None, description="Strict-Transport-Security on this route's HTTPS responses"
    )
    upgrades: list[str] = Field(
        default_factory=lambda: ["websocket"],
        description="Upgrade protocols tunnelled; others are stripped from the request",
    )

    _waf_flag = field_validator("waf", mode="before")(waf_flag)
    @field_validator("hsts", mode="before")
    @classmethod
    def _hsts_flag(cls, v: object) -> object:
        return hsts_flag(v)

    @field_validator("compress", mode="before")
    @classmethod
    def _compress_flag(cls, v: object) -> object:
        return {} if v is True else None if v is False else v

    @field_validator("host")
    @classmethod
    def _hosts(cls, v: str | list[str] | None) -> str | list[str] | None:
        for h in [v] if isinstance(v, str) else v or []:
            bare = h[2:] if h.startswith("*.") else h
            if not bare or not re.fullmatch(r"[A-Za-z0-9._-]+", bare) or "*" in bare:
                raise ValueError(f"{h!r} is not a host name or *.wildcard")
        return v

    @field_validator("path", "path_exact", "strip_prefix", "add_prefix")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None:
            if not v.startswith("/"):
                raise ValueError("must start with '/'")
            if any(c in v for c in " \r\n\0?#"):
                raise ValueError("must be a path without spaces, '?' or '#'")
        return v

    @field_validator("path_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"invalid regex {v!r}: {e}") from None
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("must name at least one method (or leave it unset for any)")
            for m in v:
                if not _TOKEN.match(m):
                    raise ValueError(f"{m!r} is not a method (an HTTP token)")
            return [m.upper() for m in v]
        return v

    @field_validator("headers")
    @classmethod
    def _header_names(cls, v: dict[str, str | HeaderMatch]) -> dict[str, str | HeaderMatch]:
        for name in v:
            _check_header_name(name)
        return v

    @field_validator("upgrades")
    @classmethod
    def _protocols(cls, v: list[str]) -> list[str]:
        for p in v:
            if not _TOKEN.match(p.split("/")[0]):
                raise ValueError(f"{p!r} is not an Upgrade protocol token")
        return [p.lower() for p in v]

    @field_validator("host_header")
    @classmethod
    def _host_value(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9._:\[\]-]+", v):
            raise ValueError(f"{v!r} is not a host[:port]")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, data: object) -> object:
        # A route with no path condition matches every path: the prefix "/".
        if isinstance(data, dict) and not {"path", "path_exact", "path_regex"} & data.keys():
            return {**data, "path": "/"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Route:
        handlers = [
            k for k in ("upstream", "split", "redirect", "respond", "static") if getattr(self, k)
        ]
        if len(handlers) != 1:
            raise ValueError(
                "give exactly one of upstream, split, redirect, respond or static"
                + (f", not {' and '.join(handlers)}" if handlers else "")
            )
        paths = [k for k in ("path", "path_exact", "path_regex") if getattr(self, k) is not None]
        if len(paths) > 1:
            raise ValueError(
                f"give one of path, path_exact or path_regex, not {' and '.join(paths)}"
            )
        if self.mirror is not None and not (self.upstream or self.split):
            raise ValueError("mirror: only a route that proxies (upstream or split) can mirror")
        if self.split is not None:
            if not self.split:
                raise ValueError("split: needs at least one upstream")
            if sum(t.weight for t in self.split) <= 0:
                raise ValueError("split: the weights sum to 0")
        if self.static is not None and self.static.alias is not None:
            if self.path is None:
                raise ValueError("static.alias: needs a path prefix (path = \"/prefix/\")")
            if self.strip_prefix is not None:
                raise ValueError("static.alias: replaces the path prefix; drop strip_prefix")
        caps = self.captures()
        if self.rewrite is not None:
            try:
                check_template(self.rewrite.to, self.rewrite_captures())
            except ValueError as e:
                raise ValueError(f"rewrite.to: {e}") from None
        for label, template in self._templates():
            try:
                check_template(template, caps)
            except ValueError as e:
                raise ValueError(f"{label}: {e}") from None
        for label, rules, reserved in (
            ("request_headers", self.request_headers, _RESERVED_REQUEST),
            ("response_headers", self.response_headers, _RESERVED_RESPONSE),
        ):
            for name in rules.names() if rules else ():
                if name.lower() in reserved:
                    why = (
                        "set by the forwarding section"
                        if name.lower() in _FORWARDING
                        else "managed by Portico (framing or connection)"
                    )
                    raise ValueError(f"{label}: {name} cannot be edited here ({why})")
                if label == "request_headers" and name.lower() == "host":
                    raise ValueError(f"{label}: use host_header to set Host")
        if (
            self.strip_prefix is not None
            and self.path is not None
            and not self.path.startswith(self.strip_prefix.rstrip("/") or "/")
        ):
            raise ValueError(
                    f"strip_prefix {self.strip_prefix!r} is not a prefix of path {self.path!r}"
                )
        return self

    def captures(self) -> frozenset[str]:
        names: set[str] = set()
        if self.path_regex is not None:
            rx = re.compile(self.path_regex)
            names |= set(rx.groupindex)
            names |= {str(i) for i in range(1, rx.groups + 1)}
        return frozenset(names)

    def _templates(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if isinstance(self.redirect, Redirect):
            out.append(("redirect.to", self.redirect.to))
        if self.respond is not None:
            out.append(("respond.body", self.respond.body))
        for label, rules in (
            ("request_headers", self.request_headers),
            ("response_headers", self.response_headers),
        ):
            if rules is not None:
                for kind in ("set", "add"):
                    for name, value in getattr(rules, kind).items():
                        out.append((f"{label}.{kind}.{name}", value))
        return out

    def upstream_names(self) -> list[str]:
        names = [self.upstream] if self.upstream else []
        names += [t.upstream for t in self.split or ()]
        if self.mirror is not None:
            names.append(self.mirror.upstream)
        if self.static is not None and self.static.fallback_upstream:
            names.append(self.static.fallback_upstream)
        return names

    def rewrite_captures(self) -> frozenset[str]:
        if self.rewrite is None:
            return frozenset()
        rx = re.compile(self.rewrite.regex)
        caps = set(rx.groupindex) | {str(i) for i in range(1, rx.groups + 1)}
        return frozenset(caps) | self.captures()


class RequestId(Strict):
    """``X-Request-ID``: kept from trusted networks, generated otherwise, sent both ways."""

    header: str = Field("X-Request-ID")
    enabled: bool = True

    @field_validator("header")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_header_name(v)


__all__ = [
    "NonNegSeconds",
    "Redirect",
    "RequestId",
    "Respond",
    "Route",
    "Static",
]


# --- description and shadowing (for `portico check`) ------------------------------------


def describe(route: Route) -> str:
    """One line: what a route matches and what it does."""
    hosts = [route.host] if isinstance(route.host, str) else route.host or ["*"]
    if route.path_exact is not None:
        path = f"={route.path_exact}"
    elif route.path_regex is not None:
        path = f"~{route.path_regex}"
    else:
        path = route.path or "/"
    extra = []
    if route.methods:
        extra.append("|".join(route.methods))
    extra += [f"{k}:{v if isinstance(v, str) else '...'}" for k, v in route.headers.items()]
    extra += [f"?{k}" for k in route.query]
    if route.clients:
        extra.append("from " + ",".join(route.clients))
    if route.priority:
        extra.append(f"priority {route.priority}")
    if route.upstream:
        action = f"-> {route.upstream}"
    elif route.split:
        action = "-> " + " / ".join(f"{t.upstream} {t.weight}" for t in route.split)
    elif route.redirect is not None:
        r = route.redirect
        action = "redirect https" if r == "https" else f"redirect {r.status} {r.to}"
    elif route.static is not None:
        action = f"static {route.static.directory()}"
    else:
        assert route.respond is not None
        action = f"respond {route.respond.status}"
    cond = f" [{', '.join(extra)}]" if extra else ""
    return f"{','.join(hosts)}{path}{cond} {action}"


def _host_covers(outer: str | list[str] | None, inner: str | list[str] | None) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False
    outs = [outer] if isinstance(outer, str) else outer
    ins = [inner] if isinstance(inner, str) else inner
    for h in ins:
        h = h.lower()
        if not any(
            o.lower() == h or (o.startswith("*.") and h.endswith(o[1:].lower())) for o in outs
        ):
            return False
    return True


def _path_covers(outer: Route, inner: Route) -> bool:
    if outer.path_regex is not None:
        return inner.path_regex == outer.path_regex
    if outer.path_exact is not None:
        return inner.path_exact == outer.path_exact
    prefix = outer.path or "/"
    if inner.path_regex is not None:
        return prefix == "/"
    return (inner.path_exact or inner.path or "/").startswith(prefix)


def covers(outer: Route, inner: Route) -> bool:
    """True when every request ``inner`` matches is also matched by ``outer`` (conservative:
    False whenever that cannot be decided from the config alone)."""
    if not _host_covers(outer.host, inner.host) or not _path_covers(outer, inner):
        return False
    if outer.methods is not None and (
        inner.methods is None or not set(inner.methods) <= set(outer.methods)
    ):
        return False
    for key in ("headers", "query"):
        o, i = getattr(outer, key), getattr(inner, key)
        if any(i.get(name) != spec for name, spec in o.items()):
            return False
    return outer.clients is None or outer.clients == inner.clients

