"""The static handler: files from a directory, with validators, ranges and sendfile.

Theory of operation. ``static_handler`` (the factory the pipeline calls) resolves the request
path to an open file descriptor before anything is written: refusals (400/404/405), the
directory redirect and listings go to the local handler, a miss goes to the fallback file
or the fallback upstream (the proxy handler), and a found file to a ``StaticExchange``. Every
HTTP decision is a pure function in ``policy/files.py``; this module only does the I/O.

The body is a list of segments: literal bytes (part headers of a multipart answer) and file
extents. On a plain connection with no body filter, extents go out with ``os.sendfile``
straight from the page cache to the socket: the handler waits for the socket to be writable
through the event loop (``add_writer`` on a duplicate of the socket's descriptor, because the
loop refuses a descriptor a transport owns) and sends only when the transport's own buffer
is empty, so bytes never overtake each other. Where sendfile cannot be used (a body filter
such as compression, or an encrypted transport) extents are read in large chunks and written
to the transport; the connection's pause/resume of the client (``client_paused``) stops the
reading, so memory stays flat whatever the file size. Each event-loop turn sends a bounded
amount, so one fast client cannot starve the others.

A file is identified by (inode, mtime, size) when it is opened: its ETag says so. Before the
last piece goes out that identity is checked again; a file rewritten in place meanwhile makes
the handler abort the connection, so a client never gets a mix of two versions presented as
one complete response under one ETag. (A file replaced by rename is never mixed: the open
descriptor keeps the old one.) The descriptor is closed on every path: completion, abort,
the client leaving, the send timeout.
"""

from __future__ import annotations

import html
import os
import secrets
import stat
import time
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import quote

from portico.codec.events import RequestHead
from portico.codec.writer import LAST_CHUNK, REASONS, chunk, status_line
from portico.dataplane.exchange import ClientSide, Handler, finish
from portico.dataplane.local import DISCARD_LIMIT
from portico.policy import files
from portico.policy.encoding import parse_accept_encoding, ranked
from portico.runtime.request import Headers, RequestState
from portico.runtime.routes import KIND_PROXY, CompiledRoute
from portico.runtime.stages import BodyFilter, LocalReply

if TYPE_CHECKING:
    from portico.runtime.static import StaticSpec

# Files up to this size are read and written with their head in one send: for small files
# that is fewer system calls than a head write plus a sendfile.
SMALL_FILE = 64 * 1024
# Read size where sendfile cannot be used; large enough to keep per-chunk overhead small.
READ_CHUNK = 256 * 1024
# Largest single sendfile call, and the most one event-loop turn sends for one response.
SENDFILE_CHUNK = 4 * 1024 * 1024
TURN_BYTES = 8 * 1024 * 1024

_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO must not block us
_PROC_FD = os.path.isdir("/proc/self/fd")

_date_cache: list[object] = [0, b""]


def _date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = files.http_date(now)
    value = _date_cache[1]
    assert isinstance(value, bytes)
    return value


class Found:
    """An open file chosen for a request."""

    __slots__ = ("coding", "fd", "name", "rel", "st", "vary")

    def __init__(
        self, fd: int, st: os.stat_result, name: str, rel: str, coding: str, vary: bool
    ) -> None:
        self.fd = fd
        self.st = st
        self.name = name  # the file name the type is taken from (not the sibling's)
        self.rel = rel  # path below the directory, with a leading '/', for cache rules
        self.coding = coding  # Content-Encoding of a precompressed sibling, or ""
        self.vary = vary  # the choice depended on Accept-Encoding


def _open_regular(path: str, spec: StaticSpec) -> tuple[int, os.stat_result] | int | None:
    """(fd, stat) of what the path names (file or directory), 403 when it may not be read,
    None when it is missing. A refused symlink escape reads as missing."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        return 403
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not spec.symlinks_outside:
            real = os.readlink(f"/proc/self/fd/{fd}") if _PROC_FD else os.path.realpath(path)
            if not files.within(real, spec.real_directory):
                os.close(fd)
                return None
    except OSError:
        os.close(fd)
        return None
    return fd, st


def _lookup(
    spec: StaticSpec, segments: list[str], accept: list[bytes]
) -> Found | LocalReply | int | None:
    rel = "/" + "/".join(segments)
    path = spec.directory + rel
    got = _open_regular(path, spec)
    if got is None or isinstance(got, int):
        return got
    fd, st = got
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        if segments[-1] != "":
            return -1  # a directory asked for without its slash: the caller redirects
        for index in spec.index:
            found = _file(spec, path + index, rel + index, index, accept)
            if found is not None:
                return found
        if spec.listing:
            return _listing(spec, path, rel)
        return None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    name = segments[-1]
    if spec.codings:
        return _with_sibling(spec, fd, st, path, rel, name, accept)
    return Found(fd, st, name, rel, "", False)


def _file(
    spec: StaticSpec, path: str, rel: str, name: str, accept: list[bytes]
) -> Found | None:
    got = _open_regular(path, spec)
    if got is None or isinstance(got, int):
        return None
    fd, st = got
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    if spec.codings:
        return _with_sibling(spec, fd, st, path, rel, name, accept)
    return Found(fd, st, name, rel, "", False)


def _with_sibling(
    spec: StaticSpec,
    fd: int,
    st: os.stat_result,
    path: str,
    rel: str,
    name: str,
    accept: list[bytes],
) -> Found:
    """The precompressed sibling the client takes best, if one exists, else the file."""
    for coding in ranked(parse_accept_encoding(accept), spec.codings) if accept else ():
        got = _open_regular(path + files.SIBLING_SUFFIX[coding], spec)
        if got is None or isinstance(got, int):
            continue
        sfd, sst = got
        if stat.S_ISREG(sst.st_mode):
            os.close(fd)
            return Found(sfd, sst, name, rel, coding, True)
        os.close(sfd)
    return Found(fd, st, name, rel, "", True)


def _listing(spec: StaticSpec, path: str, rel: str) -> LocalReply | None:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return None
    items = []
    for name in names:
        if name.startswith(".") and not spec.hidden:
            continue
        slash = "/" if os.path.isdir(os.path.join(path, name)) else ""
        items.append(
            f'<li><a href="{quote(name)}{slash}">{html.escape(name)}{slash}</a></li>'
        )
    title = html.escape(rel)
    body = (
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Index of {title}"
        f"</title></head>\n<body><h1>Index of {title}</h1>\n<ul>\n"
        + "\n".join(items)
        + "\n</ul></body></html>\n"
    ).encode("utf-8")
    return LocalReply(200, [(b"Content-Type", b"text/html; charset=utf-8")], body)


def _text_reply(status: int, headers: Headers | None = None) -> LocalReply:
    body = b"%d %b\n" % (status, REASONS.get(status, b""))
    return LocalReply(
        status, [(b"Content-Type", b"text/plain; charset=utf-8"), *(headers or [])], body
    )


def static_handler(conn: ClientSide, req: RequestState, route: CompiledRoute) -> Handler:
    """The handler for a request on a static route (see the module docstring)."""
    spec = route.static
    assert spec is not None
    head = req.head
    method = head.method
    ctx = conn.ctx
    if method not in (b"GET", b"HEAD"):
        if spec.fallback_upstream is not None:
            return ctx.handlers[KIND_PROXY](conn, req, route)
        return ctx.local(
            conn, req, route, _text_reply(405, [(b"Allow", b"GET, HEAD")]), None
        )
    segments = files.url_segments(spec.url_path(req.path), spec.hidden)
    if isinstance(segments, int):
        return ctx.local(conn, req, route, _text_reply(segments), None)
    accept = (
        [v for n, v in head.headers if n.lower() == b"accept-encoding"] if spec.codings else []
    )
    found = _lookup(spec, segments, accept)
    if found == -1:
        target = head.target
        q = target.find(b"?")
        path, query = (target, b"") if q < 0 else (target[:q], target[q:])
        reply = LocalReply(
            301,
            [(b"Location", path + b"/" + query), (b"Content-Type", b"text/plain; charset=utf-8")],
            b"",
        )
        return ctx.local(conn, req, route, reply, None)
    if found is None and spec.fallback is not None:
        name = spec.fallback.rsplit("/", 1)[-1]
        found = _file(spec, spec.directory + spec.fallback, spec.fallback, name, accept)
    if found is None:
        if spec.fallback_upstream is not None:
            return ctx.handlers[KIND_PROXY](conn, req, route)
        return ctx.local(conn, req, route, _text_reply(404), None)
    if isinstance(found, int):
        return ctx.local(conn, req, route, _text_reply(found), None)
    if isinstance(found, LocalReply):
        return ctx.local(conn, req, route, found, None)
    return StaticExchange(conn, req, route, found)


class StaticExchange:
    holding = False  # answers at once: never waits for capacity
    __slots__ = (
        "_budget",
        "_chunked",
        "_filters",
        "_keep",
        "_paused",
        "_segments",
        "_sendfile",
        "_sock",
        "_wfd",
        "client_eof",
        "conn",
        "done",
        "file",
        "head",
        "req",
        "request_done",
        "response_started",
        "route",
    )

    def __init__(
        self, conn: ClientSide, req: RequestState, route: CompiledRoute, found: Found
    ) -> None:
        self.conn = conn
        self.req = req
        self.route = route
        self.head: RequestHead = req.head
        self.file = found
        self.request_done = req.head.framing == "none"
        self.response_started = False
        self.client_eof = False
        self.done = False
        self._segments: deque[bytes | list[int]] = deque()
        self._filters: list[BodyFilter] | None = None
        self._chunked = False
        self._keep = False
        self._paused = False
        self._sendfile = False
        self._sock = -1
        self._wfd = -1
        self._budget = 0

    def __repr__(self) -> str:
        return f"<StaticExchange {self.head.method.decode()} {self.file.rel!r}>"

    # --- the response head --------------------------------------------------------------------

    def start(self) -> None:
        head = self.head
        found = self.file
        spec = self.route.static
        assert spec is not None
        st = found.st
        size = st.st_size
        tag = files.etag(st.st_mtime_ns, size, st.st_ino, found.coding)
        mtime = int(st.st_mtime)
        last_modified = files.http_date(mtime)
        conditional: dict[bytes, bytes] = {}
        for name, value in head.headers:
            lname = name.lower()
            if lname.startswith(b"if-") or lname == b"range":
                old = conditional.get(lname)
                conditional[lname] = value if old is None else old + b", " + value
        headers: Headers = [(b"Date", _date())]
        cache = files.cache_control(spec.cache_rules, found.rel)
        if cache is not None:
            headers.append((b"Cache-Control", cache))
        headers += [(b"ETag", tag), (b"Last-Modified", last_modified)]
        if found.vary:
            headers.append((b"Vary", b"Accept-Encoding"))
        verdict = files.preconditions(head.method, conditional, tag, mtime) if conditional else 0
        if verdict == files.NOT_MODIFIED:
            self._respond(304, headers, None)
            return
        ctype = files.content_type(found.name, spec.types, spec.charset)
        if verdict == files.PRECONDITION_FAILED:
            self._respond(412, headers[:1], b"412 Precondition Failed\n", b"text/plain")
            return
        headers.append((b"Accept-Ranges", b"bytes"))
        if found.coding:
            headers.append((b"Content-Encoding", found.coding.encode("ascii")))
        rng = conditional.get(b"range")
        if rng is not None and head.method == b"GET":
            if_range = conditional.get(b"if-range")
            if if_range is None or files.if_range_holds(if_range, tag, last_modified):
                ranges = files.parse_ranges(rng, size)
                if ranges == files.UNSATISFIABLE:
                    headers.append((b"Content-Range", b"bytes */%d" % size))
                    self._respond(
                        416, headers, b"416 Range Not Satisfiable\n", b"text/plain"
                    )
                    return
                if isinstance(ranges, list):
                    self._ranges(headers, ranges, size, ctype)
                    return
        headers.insert(1, (b"Content-Type", ctype))
        self._segments.append([0, size])
        self._respond(200, headers, None, length=size)

    def _ranges(self, headers: Headers, ranges: list[files.Range], size: int, ctype: bytes) -> None:
        segs = self._segments
        if len(ranges) == 1:
            first, last = ranges[0]
            headers.insert(1, (b"Content-Type", ctype))
            headers.append((b"Content-Range", b"bytes %d-%d/%d" % (first, last, size)))
            segs.append([first, last - first + 1])
            self._respond(206, headers, None, length=last - first + 1)
            return
        boundary = secrets.token_hex(12).encode("ascii")
        total = 0
        for i, (first, last) in enumerate(ranges):
            part = b"%b--%b\r\nContent-Type: %b\r\nContent-Range: bytes %d-%d/%d\r\n\r\n" % (
                b"\r\n" if i else b"", boundary, ctype, first, last, size
            )
            segs.append(part)
            segs.append([first, last - first + 1])
            total += len(part) + last - first + 1
        tail = b"\r\n--%b--\r\n" % boundary
        segs.append(tail)
        total += len(tail)
        headers.insert(1, (b"Content-Type", b"multipart/byteranges; boundary=" + boundary))
        self._respond(206, headers, None, length=total)

    def _respond(
        self,
        status: int,
        headers: Headers,
        body: bytes | None,
        ctype: bytes = b"",
        length: int | None = None,
    ) -> None:
        """Write the head (and a short body); start sending ``_segments`` if any."""
        conn = self.conn
        req = self.req
        head = self.head
        route = self.route
        if body is not None:
            headers.insert(1, (b"Content-Type", ctype + b"; charset=utf-8"))
            length = len(body)
            self._segments.clear()
            self._segments.append(body)
        if status != 304:
            # In the list the stages see, so compression can judge the size (and drop it).
            headers.append((b"Content-Length", b"%d" % (length or 0)))
        for stage in route.response_stages:
            stage.on_response(req, status, headers)
        head_only = head.method == b"HEAD" or status == 304
        if route.body_stages and not head_only:
            filters = [
                f
                for f in (s.body_filter(req, status, headers) for s in route.body_stages)
                if f is not None
            ]
            if filters:
                self._filters = filters
        keep = (
            head.keep_alive
            and not conn.ctx.closing
            and (
                head.framing == "none"
                or (head.content_length is not None and head.content_length <= DISCARD_LIMIT)
            )
        )
        out = [status_line(status)]
        out += [n + b": " + v + b"\r\n" for n, v in headers]
        if self._filters is not None:
            length = None  # the filter removed Content-Length: the body is re-framed
            if head.version == b"1.1":
                self._chunked = True
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:
                keep = False  # an HTTP/1.0 client: the end of the body is the close
        if not keep:
            out.append(b"Connection: close\r\n")
        elif head.version == b"1.0":
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        self._keep = keep
        req.status = status
        self.response_started = True
        if head_only:
            self._close_file()
            self._segments.clear()
        head_bytes = b"".join(out)
        self._setup_sendfile(length)
        self._budget = TURN_BYTES
        segs = self._segments
        if self._filters is None and length is not None and length <= SMALL_FILE:
            if len(segs) == 1 and not isinstance(segs[0], bytes):
                # The common small file: one read, one send with the head, nothing else.
                offset, n = segs.pop()
                try:
                    data = os.pread(self.file.fd, n, offset)
                except OSError:
                    data = b""
                if len(data) != n:
                    self._abort()
                    return
                req.sent_bytes = n
                conn.write(head_bytes + data)
                self._complete()
                return
            # Head and body leave in one send.
            conn.cork()
            conn.write(head_bytes)
            self._pump()
            conn.uncork()
        else:
            conn.write(head_bytes)
            self._pump()

    def _setup_sendfile(self, length: int | None) -> None:
        if self._filters is not None or not self._segments or length is None:
            return
        transport = self.conn.transport
        if transport is None or length <= SMALL_FILE:
            return
        if transport.get_extra_info("ssl_object") is not None:
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            self._sock = sock.fileno()
        except (OSError, AttributeError):
            return
        self._sendfile = self._sock >= 0

    # --- the body -------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Send segments until done, the client pushes back or this turn's budget is spent."""
        segs = self._segments
        while segs and not self.done:
            seg = segs[0]
            if isinstance(seg, bytes):
                segs.popleft()
                self._write(seg)
                continue
            if self._sendfile:
                if not self._send_extent(seg):
                    return
            elif not self._read_extent(seg):
                return
            if seg[1] == 0:
                segs.popleft()
        if not self.done:
            self._complete()

    def _write(self, data: bytes) -> None:
        filters = self._filters
        if filters is not None:
            for f in filters:
                data = f.feed(data)
            if not data:
                return
        self.req.sent_bytes += len(data)
        self.conn.write(chunk(data) if self._chunked else data)

    def _last_piece(self, seg: list[int], n: int) -> bool:
        """Whether this piece ends the body and others went before it. A body sent in one
        piece is read right after the open that identified the file: nothing to re-check."""
        if n < seg[1] or self.req.sent_bytes == 0:
            return False
        return sum(1 for s in self._segments if not isinstance(s, bytes)) == 1

    def _unchanged(self) -> bool:
        try:
            now = os.fstat(self.file.fd)
        except OSError:
            return False
        was = self.file.st
        return (now.st_mtime_ns, now.st_size, now.st_ino) == (
            was.st_mtime_ns,
            was.st_size,
            was.st_ino,
        )

    def _read_extent(self, seg: list[int]) -> bool:
        """Read and write one chunk; False when the turn ends (paused, budget, failure)."""
        if self._paused:
            return False
        if self._budget <= 0:
            self._budget = TURN_BYTES
            self.conn.ctx.loop.call_soon(self._pump)
            return False
        offset, left = seg
        n = min(left, READ_CHUNK)
        if self._last_piece(seg, n) and not self._unchanged():
            self._abort()
            return False
        try:
            data = os.pread(self.file.fd, n, offset)
        except OSError:
            data = b""
        if len(data) != n:
            self._abort()  # the file shrank under us: the promised length cannot be kept
            return False
        seg[0] += n
        seg[1] -= n
        self._budget -= n
        self._write(data)
        return True

    def _send_extent(self, seg: list[int]) -> bool:
        """One sendfile call; False when the turn ends (socket full, budget, failure)."""
        conn = self.conn
        transport = conn.transport
        if transport is None:
            return False
        if transport.get_write_buffer_size() or self._budget <= 0:
            # Bytes still in the transport must leave first; a spent budget yields the turn.
            self._budget = TURN_BYTES
            self._wait_writable()
            return False
        offset, left = seg
        n = min(left, SENDFILE_CHUNK)
        if self._last_piece(seg, n) and not self._unchanged():
            self._abort()
            return False
        try:
            sent = os.sendfile(self._sock, self.file.fd, offset, n)
        except (BlockingIOError, InterruptedError):
            self._wait_writable()
            return False
        except OSError:
            self._abort()  # the client reset the connection, or the file is unreadable
            return False
        if sent == 0:
            self._abort()  # the file shrank under us
            return False
        seg[0] += sent
        seg[1] -= sent
        self._budget -= sent
        self.req.sent_bytes += sent
        if self.conn.up_timer.armed:
            self.conn.up_timer.clear()
        return True

    def _wait_writable(self) -> None:
        if self._wfd < 0:
            # The loop will not watch a descriptor its transport owns; a duplicate of it
            # refers to the same socket and is watched independently.
            self._wfd = os.dup(self._sock)
            self.conn.ctx.loop.add_writer(self._wfd, self._on_writable)
        self.conn.up_timer.set(self.conn.ctx.settings.send_timeout)

    def _on_writable(self) -> None:
        if self.done:
            return
        self._budget = TURN_BYTES
        self._pump()

    def _stop_writer(self) -> None:
        wfd = self._wfd
        if wfd >= 0:
            self._wfd = -1
            self.conn.ctx.loop.remove_writer(wfd)
            os.close(wfd)

    def _close_file(self) -> None:
        fd = self.file.fd
        if fd >= 0:
            self.file.fd = -1
            os.close(fd)

    def _complete(self) -> None:
        filters = self._filters
        conn = self.conn
        if filters is not None:
            tail = b""
            for f in filters:
                if tail:
                    tail = f.feed(tail)
                tail += f.end()
            if tail:
                self.req.sent_bytes += len(tail)
                conn.write(chunk(tail) if self._chunked else tail)
        if self._chunked:
            conn.write(LAST_CHUNK)
        self.done = True
        self._release()
        finish(conn, self.req)
        conn.exchange_finished(self._keep)

    def _release(self) -> None:
        self._stop_writer()
        self._close_file()
        self._segments.clear()
        if self.conn.up_timer.armed:
            self.conn.up_timer.clear()

    def _abort(self) -> None:
        if self.done:
            return
        self.done = True
        self._release()
        conn = self.conn
        finish(conn, self.req)
        conn.detach()
        conn.abort()

    # --- what the connection tells us ------------------------------------------------------------

    def on_request_data(self, data: bytes) -> None:
        return None

    def on_request_end(self) -> None:
        self.request_done = True

    def tunnel_from_client(self, data: bytes) -> None:
        return None

    def client_paused(self) -> None:
        self._paused = True

    def client_resumed(self) -> None:
        self._paused = False
        if not self.done and self._segments and not self._sendfile:
            self._budget = TURN_BYTES
            self._pump()

    def client_gone(self) -> None:
        if self.done:
            return
        self.done = True
        self._release()
        if not self.req.status:
            self.req.status = 499
        finish(self.conn, self.req)

    def on_upstream_timeout(self) -> None:
        # The send timeout while waiting for the socket: the client stopped reading.
        self._abort()
