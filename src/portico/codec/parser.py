"""Strict HTTP/1.1 parsers: bytes in, events out, no sockets.

Theory of operation. llhttp (through httptools) does the byte-level work and already refuses
the classic smuggling vectors: Content-Length together with Transfer-Encoding, repeated
Content-Length, bad chunk sizes, bare LF, obs-fold and control bytes in fields. On top of it
we enforce what llhttp leaves to the application:

* requests: exactly one Host on HTTP/1.1, holding only host and port characters;
  ``Transfer-Encoding`` only as a single ``chunked`` (another coding before it is 501, RFC
  9112 6.1; anything else 400), and never in HTTP/1.0; header names with ``_`` dropped unless
  allowed, and always when they would read as a forwarding header Portico sets;
  HTTP/1.0 or 1.1 only; size limits (414 for the target, 431 for the head, 413 for the
  body); ``Expect`` other than ``100-continue`` is refused (417); CONNECT is not served (501).
* responses: framing fixed from the request method (HEAD) and the status (1xx/204/304);
  ``Transfer-Encoding`` other than ``chunked`` is refused; a body that ends before its
  framing says is reported as truncated, never as complete; bytes that follow a complete
  response are reported (``garbage``) so the connection is never reused.

Extension methods. llhttp knows a fixed list of methods and fails on any other, but RFC 9110
9.1 allows any token (``PURGE``, ``BAN``, ``VERSION-CONTROL``...). So at a message boundary the
parser looks at the method token before llhttp does: a token llhttp does not know is replaced
by ``GET`` in the bytes llhttp sees and restored in the ``RequestHead``. llhttp treats request
framing alike for every method but CONNECT, which it knows. The check is one ``startswith``
on a tuple of the common methods per request (a ``find`` and a set lookup for the others); a
token split across reads is held until its space arrives. A pipelined extension-method
request after another in the same read is found by llhttp's error and that read is parsed
again one byte at a time (rare: clients do not pipeline those).

``feed`` returns the events completed by that data. A protocol error raises
:class:`portico.errors.ProtocolError` (requests) or :class:`portico.errors.BadResponse`
(responses); after an error the parser is dead and the connection must be closed.
"""

from __future__ import annotations

import httptools

from portico.codec.events import (
    END_OF_MESSAGE,
    Data,
    EndOfMessage,
    Event,
    Framing,
    Headers,
    RequestHead,
    ResponseHead,
)
from portico.codec.headers import FORWARDING, connection_tokens
from portico.errors import BadResponse, ProtocolError

_CHUNKED = b"chunked"

# RFC 9110 5.6.2 tchar: the bytes a method token may hold.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Longest extension method held back while waiting for its space (longer ones are refused by
# llhttp as it sees them, 400).
_MAX_METHOD = 32
# What llhttp is shown in place of a method it does not know.
_STAND_IN = b"GET"
# Forwarding fields as a WSGI server would read a name with underscores (X_Forwarded_For).
_SHADOWED = frozenset(name.replace(b"-", b"_") for name in FORWARDING)


def _llhttp_methods() -> frozenset[bytes]:
    """The methods this llhttp accepts in an HTTP request; asked of llhttp itself, since the
    list grows between versions (QUERY is recent). PRI is left to llhttp (the HTTP/2 preface)."""
    candidates = (
        b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH"
        b" SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY"
        b" SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY"
    ).split()
    known = {b"PRI"}
    for method in candidates:
        try:
            httptools.HttpRequestParser(None).feed_data(method + b" / HTTP/1.1\r\nHost: a\r\n")
        except httptools.HttpParserError:
            continue
        known.add(method)
    return frozenset(known)


_KNOWN_METHODS = _llhttp_methods()
# Checked first, with their space: nearly every request starts with one of these.
_COMMON_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")

# Bytes a Host value may hold (RFC 3986 host and port: reg-name, IP literal, pct-encoding).
# Anything else (space, '/', '@', '?'...) makes Host ambiguous to whatever uses it next, and
# RFC 9112 3.2 requires a 400 for an invalid Host.
_HOST_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]%"


class _Stop(Exception):
    """Raised inside a parser callback to stop llhttp where we decide the message ends."""


class RequestParser:
    """Parses a stream of pipelined requests from one client connection.

    After an ``Upgrade`` (or any request whose bytes after the head are not HTTP), the parser
    stops and keeps the following bytes in ``upgrade_leftover``; call :meth:`resume` to go on
    parsing HTTP (the backend refused the upgrade) or take the bytes for a tunnel.
    """

    __slots__ = (
        "_at_boundary",
        "_body_bytes",
        "_conn_values",
        "_drop_underscores",
        "_error",
        "_events",
        "_expect",
        "_fed",
        "_fields_left",
        "_head_bytes",
        "_headers",
        "_host",
        "_host_count",
        "_in_head",
        "_max_body",
        "_max_header_bytes",
        "_max_headers",
        "_max_target",
        "_method",
        "_parser",
        "_pending",
        "_te",
        "_te_count",
        "_url",
        "upgrade_leftover",
        "upgrade_pending",
    )

    def __init__(
        self,
        *,
        max_target: int = 8192,
        max_header_bytes: int = 32768,
        max_headers: int = 100,
        max_body: int | None = None,
        drop_underscores: bool = True,
    ) -> None:
        self.set_limits(max_target, max_header_bytes, max_headers, max_body, drop_underscores)
        self._at_boundary = True
        self._pending = b""
        self._method: bytes | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._error: ProtocolError | None = None
        self.upgrade_pending = False
        self.upgrade_leftover = b""
        self._reset_message()
        self._in_head = False


    def set_limits(
        self,
        max_target: int,
        max_header_bytes: int,
        max_headers: int,
        max_body: int | None,
        drop_underscores: bool = True,
    ) -> None:
        """Limits for the requests from now on (a reload changed them between requests)."""
        self._drop_underscores = drop_underscores
        self._max_target = max_target
        self._max_header_bytes = max_header_bytes
        self._max_headers = max_headers
        self._max_body = max_body

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: Headers = []
        self._host: bytes | None = None
        self._host_count = 0
        self._te: bytes | None = None
        self._te_count = 0
        self._conn_values: list[bytes] = []
        self._expect: bytes | None = None
        self._head_bytes = 0
        self._fields_left = self._max_headers
        self._fed = 0
        self._body_bytes = 0

    @property
    def in_head(self) -> bool:
        """True while a request head has started but is not complete (for the 408 timer)."""
        return self._in_head

    # --- public API -------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        if self.upgrade_pending:
            self.upgrade_leftover += data
            return []
        events: list[Event] = []
        self._events = events
        was_in_head = self._in_head
        original = data
        started_at_boundary = self._at_boundary
        # The hot path: a common method, whole. One startswith on a tuple, in C.
        if started_at_boundary and (self._pending or not data.startswith(_COMMON_METHODS)):
            rewritten = self._rewrite_method(data)
            if rewritten is None:
                return events  # an unknown method token, not whole yet: held
            data = rewritten
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            if started_at_boundary and any(type(e) is EndOfMessage for e in events):
                return self._replay(original)
            raise ProtocolError("invalid method", 400) from None
        except httptools.HttpParserUpgrade as exc:
            self.upgrade_pending = True
            self.upgrade_leftover = data[exc.args[0] :]
        except httptools.HttpParserCallbackError as exc:
            err = exc.__context__
            if isinstance(err, ProtocolError):
                raise err from None
            raise
        except httptools.HttpParserError as exc:
            raise ProtocolError(f"malformed request: {exc}", 400) from None
        if was_in_head and self._in_head:
            # The whole feed belonged to an unfinished head. Bound it here too, because llhttp
            # buffers a partial field internally and reports it only once the field ends.
            self._fed += len(data)
            if self._fed > self._max_header_bytes + self._max_target:
                if not self._headers and len(self._url) >= self._max_target:
                    raise ProtocolError("request target too long", 414)
                raise ProtocolError("request header fields too large", 431)
        return events

    def _rewrite_method(self, data: bytes) -> bytes | None:
        """``data`` with an extension method replaced for llhttp (and remembered), ``data``
        itself for a method llhttp knows, or None while the token is incomplete."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        space = data.find(b" ", 0, _MAX_METHOD + 1)
        if space > 0:
            method = data[:space]
            if method in _KNOWN_METHODS or method.translate(None, _TCHAR):
                return data  # known, or not a token: llhttp's to judge
            self._method = method
            self._in_head = True
            return _STAND_IN + data[space:]
        if space == -1 and len(data) <= _MAX_METHOD and not data.translate(None, _TCHAR):
            self._pending = data
            self._in_head = bool(data)
            return None
        return data

    def _replay(self, data: bytes) -> list[Event]:
        """Parse ``data`` again from the boundary it started at, one byte per feed, so each
        pipelined request starts a feed and has its method looked at."""
        self._parser = httptools.HttpRequestParser(self)
        self._at_boundary = True
        self._pending = b""
        self._method = None
        self._in_head = False
        events: list[Event] = []
        for i in range(len(data)):
            if self.upgrade_pending:
                self.upgrade_leftover += data[i:]
                break
            events += self.feed(data[i : i + 1])
        self._events = events
        return events

    def complete_before_error(self) -> list[Event]:
        """After ``feed`` raised: the whole requests that preceded the bad one in that feed.

        A pipelining client is owed answers to those, in order, before the error response.
        """
        events = self._events
        last = max((i for i, e in enumerate(events) if type(e) is EndOfMessage), default=-1)
        return events[: last + 1]

    def resume(self) -> bytes:
        """Go back to HTTP after an upgrade that did not happen; returns the held bytes.

        The caller feeds the returned bytes back in (they are the next request, if any).
        """
        leftover = self.upgrade_leftover
        self.upgrade_leftover = b""
        self.upgrade_pending = False
        self._parser = httptools.HttpRequestParser(self)
        self._in_head = False
        self._at_boundary = True
        return leftover

    # --- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_message()
        self._in_head = True
        self._at_boundary = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_target:
            raise ProtocolError("request target too long", 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # chunked trailers: dropped, the proxy does not forward them
        headers = self._headers
        self._head_bytes += len(name) + len(value) + 4
        # 95 is "_": an int needle, so no TypeError is built per header.
        if 95 in name and (self._drop_underscores or name.lower() in _SHADOWED):
            # Some WSGI servers read X_Forwarded_For as X-Forwarded-For: passed on, it would
            # get around the forwarding rules. Dropped as nginx does (counted in the limits).
            self._fields_left -= 1  # still counted against max_headers
            if len(headers) > self._fields_left or self._head_bytes > self._max_header_bytes:
                raise ProtocolError("request header fields too large", 431)
            return
        headers.append((name, value))
        if len(headers) > self._fields_left or self._head_bytes > self._max_header_bytes:
            raise ProtocolError("request header fields too large", 431)
        # Only a handful of names matter to framing; compare lengths first to stay cheap.
        n = len(name)
        if n == 4 and name.lower() == b"host":
            self._host = value
            self._host_count += 1
        elif n == 10 and name.lower() == b"connection":
            self._conn_values.append(value)
        elif n == 17 and name.lower() == b"transfer-encoding":
            self._te = value
            self._te_count += 1
        elif n == 6 and name.lower() == b"expect":
            self._expect = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        version = parser.get_http_version()
        if version == "1.1":
            vbytes = b"1.1"
            if self._host_count != 1:
                raise ProtocolError("HTTP/1.1 request needs exactly one Host header", 400)
        elif version == "1.0":
            vbytes = b"1.0"
            if self._host_count > 1:
                raise ProtocolError("more than one Host header", 400)
        else:
            raise ProtocolError(f"HTTP/{version} is not supported", 505)
        if self._host is not None and self._host.translate(None, _HOST_BYTES):
            raise ProtocolError("invalid Host header", 400)
        method = self._method
        if method is None:
            method = parser.get_method()
        else:
            self._method = None
        if method == b"CONNECT":
            raise ProtocolError("CONNECT is not served by a reverse proxy", 501)
        if not self._url:
            raise ProtocolError("empty request target", 400)
        if self._head_bytes + len(self._url) > self._max_header_bytes:
            raise ProtocolError("request header fields too large", 431)
        framing: Framing = "none"
        content_length: int | None = None
        if self._te_count:
            if self._te_count > 1:
                raise ProtocolError("more than one Transfer-Encoding header", 400)
            codings = [c.strip().lower() for c in self._te.split(b",")]  # type: ignore[union-attr]
            if codings[-1] != _CHUNKED or codings.count(_CHUNKED) > 1:
                # RFC 9112 6.3: a request whose final coding is not chunked has no framing.
                raise ProtocolError("Transfer-Encoding must end in a single 'chunked'", 400)
            if len(codings) > 1:
                # RFC 9112 6.1: a transfer coding the server does not understand is 501.
                raise ProtocolError(
                    f"transfer coding {codings[0].decode('latin-1')!r} is not implemented", 501
                )
            if vbytes == b"1.0":
                # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing.
                raise ProtocolError("Transfer-Encoding in an HTTP/1.0 request", 400)
            framing = "chunked"
        else:
            content_length = self._content_length_header()
            if content_length:
                framing = "length"
                if self._max_body is not None and content_length > self._max_body:
                    raise ProtocolError("request body too large", 413)
        expect_continue = False
        if self._expect is not None:
            if self._expect.strip().lower() != b"100-continue":
                raise ProtocolError("unsupported expectation", 417)
            expect_continue = vbytes == b"1.1"
        tokens = connection_tokens(self._conn_values) if self._conn_values else frozenset()
        self._events.append(
            RequestHead(
                method,
                self._url,
                vbytes,
                self._headers,
                host=self._host,
                keep_alive=parser.should_keep_alive(),
                framing=framing,
                content_length=content_length,
                connection_tokens=tokens,
                expect_continue=expect_continue,
                upgrade=parser.should_upgrade(),
            )
        )

    def _content_length_header(self) -> int | None:
        # llhttp has validated the digits and refused duplicates; read the value once.
        for name, value in self._headers:
            if len(name) == 14 and name.lower() == b"content-length":
                return int(value)
        return None

    def on_body(self, body: bytes) -> None:
        if self._max_body is not None:
            self._body_bytes += len(body)
            if self._body_bytes > self._max_body:
                raise ProtocolError("request body too large", 413)
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._events.append(END_OF_MESSAGE)
        self._at_boundary = True


class ResponseParser:
    """Parses the response(s) to one request at a time from an upstream connection.

    Call :meth:`expect` before each request with its method; the parser then emits zero or
    more informational heads, one final head, body data and ``EndOfMessage``. Anything the
    upstream sends when no response is expected sets ``garbage``.
    """

    __slots__ = (
        "_conn_values",
        "_done",
        "_events",
        "_framing",
        "_head_method",
        "_headers",
        "_in_headers",
        "_parser",
        "_reason",
        "_te",
        "_te_count",
        "garbage",
        "upgrade_leftover",
        "upgraded",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._events: list[Event] = []
        self._done = True
        self._head_method = False
        self._framing: Framing = "none"
        self.garbage = False
        self.upgraded = False
        self.upgrade_leftover = b""
        self._start_message()

    def _start_message(self) -> None:
        self._headers: Headers = []
        self._reason = b""
        self._te: bytes | None = None
        self._te_count = 0
        self._conn_values: list[bytes] = []
        self._in_headers = True

    def expect(self, method: bytes) -> None:
        """Arm the parser for the response to a request with this method."""
        self._done = False
        self._head_method = method == b"HEAD"
        self._framing = "none"

    @property
    def complete(self) -> bool:
        return self._done

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        self._events = events
        if self._done:
            self.garbage = True
            return events
        try:
            self._parser.feed_data(data)
        except _Stop:
            pass
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            self.upgrade_leftover = data[exc.args[0] :]
        except httptools.HttpParserCallbackError as exc:
            err = exc.__context__
            if isinstance(err, _Stop):
                pass
            elif isinstance(err, BadResponse):
                raise err from None
            else:
                raise
        except httptools.HttpParserError as exc:
            raise BadResponse(f"malformed response from upstream: {exc}") from None
        return events

    def feed_eof(self) -> list[Event]:
        """The upstream closed. Completes a close-delimited body; anything else is truncated."""
        if self._done:
            return []
        if self._framing == "close" and not self._in_headers:
            self._done = True
            return [END_OF_MESSAGE]
        raise BadResponse("upstream closed before the response was complete")

    # --- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:
            self.garbage = True
            raise _Stop
        self._start_message()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_headers:
            return  # trailers are dropped
        self._headers.append((name, value))
        n = len(name)
        if n == 10 and name.lower() == b"connection":
            self._conn_values.append(value)
        elif n == 17 and name.lower() == b"transfer-encoding":
            self._te = value
            self._te_count += 1

    def on_headers_complete(self) -> None:
        self._in_headers = False
        parser = self._parser
        status = parser.get_status_code()
        version = parser.get_http_version()
        if version == "1.1":
            vbytes = b"1.1"
        elif version == "1.0":
            vbytes = b"1.0"
        else:
            raise BadResponse(f"upstream answered with HTTP/{version}")
        if not 100 <= status <= 599:
            # RFC 9110 15: outside 100..599 is invalid. llhttp takes any three digits, and
            # would frame 0xx with a body but let the proxy treat it as interim.
            raise BadResponse(f"upstream answered with invalid status {status:03d}")
        content_length: int | None = None
        framing: Framing
        if status < 200 or status in (204, 304):
            framing = "none"
            if status < 200 and self._te_count:
                raise BadResponse("informational response with a body")
        elif self._te_count:
            if self._te_count > 1 or self._te.strip().lower() != _CHUNKED:  # type: ignore[union-attr]
                raise BadResponse("upstream used a transfer coding other than 'chunked'")
            framing = "chunked"
        else:
            for name, value in self._headers:
                if len(name) == 14 and name.lower() == b"content-length":
                    content_length = int(value)
                    break
            framing = "length" if content_length is not None else "close"
        if self._head_method and status >= 200:
            # A HEAD response describes a body it does not carry; llhttp cannot be told, so
            # stop here. The connection is not reused (see UpstreamConnection).
            self._events.append(
                ResponseHead(
                    status,
                    self._reason,
                    vbytes,
                    self._headers,
                    keep_alive=False,
                    framing="none",
                    content_length=content_length,
                    connection_tokens=connection_tokens(self._conn_values),
                )
            )
            self._done = True
            self._events.append(END_OF_MESSAGE)
            raise _Stop
        if status >= 200:
            self._framing = framing
        self._events.append(
            ResponseHead(
                status,
                self._reason,
                vbytes,
                self._headers,
                keep_alive=parser.should_keep_alive(),
                framing=framing,
                content_length=content_length,
                connection_tokens=(
                    connection_tokens(self._conn_values) if self._conn_values else frozenset()
                ),
            )
        )

    def on_body(self, body: bytes) -> None:
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() < 200:
            return  # interim response: the final one follows on the same parser
        self._done = True
        self._events.append(END_OF_MESSAGE)
