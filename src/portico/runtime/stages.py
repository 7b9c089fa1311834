"""Route stages: per-route request and response edits, built once per config.

A stage sees the request before the handler (``on_request``: edit the head, or answer with a
``LocalReply``), the response head before it is written (``on_response``: edit the header
list in place) and may wrap the response body (``body_filter``: a streaming transform, fed
chunk by chunk, never the whole body). Stages are pure: they read and write values on
``RequestState``; the data plane does the I/O around them. A route holds only the stages its
config asks for, so an unconfigured feature costs nothing per request.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from typing import ClassVar

from mypy_extensions import mypyc_attr

from portico.codec.writer import REASONS, status_line
from portico.runtime.request import Headers, RequestState, Template


class LocalReply:
    """A response the gateway writes itself. Bytes are prebuilt where nothing varies."""

    __slots__ = ("body", "headers", "refusal", "status")

    def __init__(
        self, status: int, headers: Headers, body: bytes = b"", refusal: str | None = None
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        # Why a traffic stage turned the request away ("rate_limit", "shed"...): a metric label.
        self.refusal = refusal

    def encode(self, close: bool, head_only: bool = False, date: bytes = b"") -> bytes:
        """The whole response; ``date``: the ``Date`` line to add (the caller has the clock)."""
        out = [status_line(self.status, REASONS.get(self.status, b"Unknown"))]
        out += [n + b": " + v + b"\r\n" for n, v in self.headers]
        if date:
            out.append(date)
        bodiless = self.status in (204, 304)  # RFC 9110 8.6: no Content-Length, no body
        if not bodiless:
            out.append(b"Content-Length: %d\r\n" % len(self.body))
        if close:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        if not head_only and not bodiless:
            out.append(self.body)
        return b"".join(out)


Resume = Callable[["LocalReply | Hold | None"], None]


# Subclassed by stage modules that stay interpreted in the accelerated build (setup.py).
@mypyc_attr(allow_interpreted_subclasses=True)
class Hold:
    """What ``on_request`` returns to pause a request before the next stage: for ``delay``
    seconds (a rate limit's nginx-style delay), or, with ``start``, until the decision an I/O
    stage is waiting for arrives: the pipeline calls ``start(resume)`` and the stage calls
    ``resume`` once with a reply, another hold, or None to go on. With ``again`` the stage
    that held is asked again after the delay (load shedding waiting for room)."""

    __slots__ = ("again", "delay", "start")

    def __init__(
        self,
        delay: float = 0.0,
        start: Callable[[Resume], None] | None = None,
        again: bool = False,
    ) -> None:
        self.delay = delay
        self.start = start
        self.again = again


# Subclassed by stage modules that stay interpreted in the accelerated build (setup.py).
@mypyc_attr(allow_interpreted_subclasses=True)
class BodyFilter:
    """A streaming transform of a response body. ``feed`` and ``end`` return bytes to send."""

    __slots__ = ()

    def feed(self, data: bytes) -> bytes:
        return data

    def end(self) -> bytes:
        return b""


# Subclassed by stage modules that stay interpreted in the accelerated build (setup.py).
@mypyc_attr(allow_interpreted_subclasses=True)
class Stage:
    """Base of route stages: every hook does nothing unless overridden."""

    __slots__ = ()
    #: which hooks a subclass implements, so a route keeps only stages that act
    # ClassVar: one value per stage class (and mypyc keeps it a class attribute, so a
    # subclass's override is seen in the accelerated build too).
    on_request_hook: ClassVar[bool] = False
    on_response_hook: ClassVar[bool] = False
    body_hook: ClassVar[bool] = False

    def on_request(self, req: RequestState) -> LocalReply | Hold | None:
        return None

    def on_response(self, req: RequestState, status: int, headers: Headers) -> None:
        return None

    def body_filter(self, req: RequestState, status: int, headers: Headers) -> BodyFilter | None:
        return None


def _remove(headers: Headers, names: frozenset[bytes], lengths: frozenset[int]) -> Headers:
    # The length test first: most headers cannot match, and it costs no lowered copy and no
    # hash of one (a third of what header rules cost per request, measured with callgrind).
    return [(n, v) for n, v in headers if len(n) not in lengths or n.lower() not in names]


def _lengths(names: frozenset[bytes]) -> frozenset[int]:
    return frozenset(len(n) for n in names)


class HeaderEdit:
    """Compiled set/add/remove rules for one direction."""

    __slots__ = ("add", "drop", "drop_lengths", "set")

    def __init__(
        self, set_: dict[str, str], add: dict[str, str], remove: Sequence[str]
    ) -> None:
        self.set = [(n.encode("latin-1"), Template(v)) for n, v in set_.items()]
        self.add = [(n.encode("latin-1"), Template(v)) for n, v in add.items()]
        self.drop = frozenset(n.lower().encode("latin-1") for n in [*remove, *set_])
        self.drop_lengths = _lengths(self.drop)

    def apply(self, req: RequestState, headers: Headers) -> Headers:
        out = _remove(headers, self.drop, self.drop_lengths) if self.drop else headers
        for name, tpl in self.set:
            out.append((name, tpl.render(req)))
        for name, tpl in self.add:
            out.append((name, tpl.render(req)))
        return out


class RequestHeaders(Stage):
    __slots__ = ("edit", "written")
    on_request_hook = True

    def __init__(self, edit: HeaderEdit) -> None:
        self.edit = edit
        self.written = frozenset(n.lower() for n, _ in [*edit.set, *edit.add])

    def on_request(self, req: RequestState) -> LocalReply | None:
        head = req.head
        headers = list(head.headers)
        tokens = head.connection_tokens
        hit = tokens & self.written if tokens else None
        if hit:
            # A client naming a header in Connection makes it hop-by-hop, which would drop
            # the value this rule writes: the client's own copies go, the rule's stay.
            headers = _remove(headers, hit, _lengths(hit))
            head.connection_tokens = tokens - hit
        head.headers = self.edit.apply(req, headers)
        return None


class ResponseHeaders(Stage):
    __slots__ = ("edit",)
    on_response_hook = True

    def __init__(self, edit: HeaderEdit) -> None:
        self.edit = edit

    def on_response(self, req: RequestState, status: int, headers: Headers) -> None:
        headers[:] = self.edit.apply(req, headers)


# Longest request ID kept from a trusted client; longer ones are replaced, not truncated.
MAX_REQUEST_ID = 200
_ID_OK = re.compile(rb"^[\x21-\x7e]{1,%d}$" % MAX_REQUEST_ID)


class RequestId(Stage):
    """Keep a trusted client's request ID, otherwise make one; send it up and back down.

    A new ID is 32 hex digits: 16 random per stage (made when the config compiles, so per
    process and per reload) and a 16-digit counter. Unique without a ``getrandom`` system
    call per request (which was a seventh system call on every request); like nginx's
    ``$request_id`` it identifies a request, it is not a secret."""

    __slots__ = ("_count", "_prefix", "lname", "name")
    on_request_hook = True

    def __init__(self, header: str) -> None:
        self.name = header.encode("latin-1")
        self.lname = self.name.lower()
        self._prefix = secrets.token_hex(8).encode("ascii")
        self._count = 0

    def on_request(self, req: RequestState) -> LocalReply | None:
        head = req.head
        lname = self.lname
        size = len(lname)
        found: bytes | None = None
        for n, v in head.headers:
            if len(n) == size and n.lower() == lname:
                found = v
                break
        if found is not None and req.peer_trusted and _ID_OK.match(found):
            req.request_id = found
            return None
        self._count = count = self._count + 1
        req.request_id = rid = self._prefix + b"%016x" % count
        if found is not None:
            head.headers = [(n, v) for n, v in head.headers if n.lower() != lname]
        head.headers.append((self.name, rid))
        return None



class EchoRequestId(Stage):
    """Returns the request ID to the client; last in the chain so rules cannot drop it."""

    __slots__ = ("lname", "name")
    on_response_hook = True

    def __init__(self, header: str) -> None:
        self.name = header.encode("latin-1")
        self.lname = self.name.lower()

    def on_response(self, req: RequestState, status: int, headers: Headers) -> None:
        lname = self.lname
        size = len(lname)
        headers[:] = [(n, v) for n, v in headers if len(n) != size or n.lower() != lname]
        if req.request_id:
            headers.append((self.name, req.request_id))


class PathRewrite(Stage):
    """strip_prefix, add_prefix and a regex rewrite, in that order, on the path only."""

    __slots__ = ("add", "regex", "strip", "to")
    on_request_hook = True

    def __init__(
        self,
        strip: str | None,
        add: str | None,
        regex: str | None,
        to: str | None,
    ) -> None:
        self.strip = strip.encode() if strip else None
        self.add = add.rstrip("/").encode() if add else None
        self.regex = re.compile(regex) if regex else None
        self.to = Template(to) if to is not None else None

    def on_request(self, req: RequestState) -> LocalReply | None:
        path = req.path
        strip = self.strip
        if strip is not None and path.startswith(strip):
            path = path[len(strip) :]
            if not path.startswith(b"/"):
                path = b"/" + path
        if self.add is not None:
            path = self.add + path
        rx = self.regex
        if rx is not None and self.to is not None:
            text = path.decode("latin-1")
            m = rx.search(text)
            if m is not None:
                saved = req.captures
                caps = dict(saved or {})
                caps.update({k: v for k, v in m.groupdict().items() if v is not None})
                caps.update({str(i): g for i, g in enumerate(m.groups(), 1) if g is not None})
                req.captures = caps
                replaced = self.to.render(req).decode("latin-1")
                req.captures = saved
                text = text[: m.start()] + replaced + text[m.end() :]
                path = text.encode("latin-1")
                if not path.startswith(b"/"):
                    path = b"/" + path
        req.set_path(path)
        return None


class PrefixFix(Stage):
    """Make a prefix-changed app's absolute paths true for the client (nginx ``proxy_redirect``
    and ``proxy_cookie_path``/``proxy_cookie_domain``)."""

    __slots__ = ("add", "domains", "location", "path_cookie", "strip")
    on_response_hook = True

    def __init__(
        self,
        strip: str | None,
        add: str | None,
        location: bool,
        cookie_path: bool,
        domains: dict[str, str],
    ) -> None:
        self.strip = strip.rstrip("/").encode() if strip else b""
        self.add = add.rstrip("/").encode() if add else b""
        self.location = location
        self.path_cookie = cookie_path
        self.domains = {k.lower().encode(): v.encode() for k, v in domains.items()}

    def client_path(self, path: bytes) -> bytes:
        """Map a path as the app sees it back to the path the client uses."""
        add, strip = self.add, self.strip
        if add:
            if path == add or path.startswith(add + b"/"):
                path = path[len(add) :] or b"/"
            else:
                return path  # outside what this route maps: leave it alone
        if strip and not (path == strip or path.startswith(strip + b"/")):
            path = strip + path
        return path

    def on_response(self, req: RequestState, status: int, headers: Headers) -> None:
        for i, (name, value) in enumerate(headers):
            lname = name.lower()
            if lname == b"location" and self.location:
                headers[i] = (name, self._location(req, value))
            elif lname == b"set-cookie" and (self.path_cookie or self.domains):
                headers[i] = (name, self._cookie(value))

    def _location(self, req: RequestState, value: bytes) -> bytes:
        if value.startswith(b"/") and not value.startswith(b"//"):
            return self.client_path(value)
        scheme_end = value.find(b"://")
        if scheme_end > 0 and req.upstream is not None:
            rest = value[scheme_end + 3 :]
            slash = rest.find(b"/")
            authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
            if authority.lower() == req.upstream.encode().lower() and req.host:
                # The app named its own address: point the client at the gateway instead.
                return req.scheme + b"://" + req.host + self.client_path(path)
            if req.host and authority.lower() == req.host.lower():
                # The app built an absolute URL from the Host it was sent (the client's): the
                # address is right, the path lacks the prefix.
                return value[: scheme_end + 3] + authority + self.client_path(path)
        return value

    def _cookie(self, value: bytes) -> bytes:
        parts = value.split(b";")
        for i, part in enumerate(parts[1:], 1):
            key, eq, attr = part.strip().partition(b"=")
            lkey = key.lower()
            if lkey == b"path" and eq and self.path_cookie and attr.startswith(b"/"):
                parts[i] = b" Path=" + self.client_path(attr)
            elif lkey == b"domain" and eq and self.domains:
                new = self.domains.get(attr.lower().lstrip(b"."))
                if new is not None:
                    parts[i] = b" Domain=" + new
        return b";".join(parts)


class StickyCookie(Stage):
    """Adds the sticky-session cookie a proxy handler asked for (``req.set_cookie``)."""

    __slots__ = ()
    on_response_hook = True

    def on_response(self, req: RequestState, status: int, headers: Headers) -> None:
        cookie = req.set_cookie
        if cookie is not None:
            headers.append((b"Set-Cookie", cookie))


Chain = tuple[Stage, ...]


def hooks(stages: Sequence[Stage]) -> tuple[Chain, Chain, Chain]:
    """Split a chain into the stages that act on requests, response heads and bodies."""
    return (
        tuple(s for s in stages if s.on_request_hook),
        tuple(s for s in stages if s.on_response_hook),
        tuple(s for s in stages if s.body_hook),
    )
