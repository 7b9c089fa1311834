"""The HTTP/1.1 codec: bytes in, exact events out; whole and one byte at a time."""

from __future__ import annotations

import pytest

from portico.codec.events import Data, EndOfMessage, Event, RequestHead, ResponseHead
from portico.codec.parser import RequestParser, ResponseParser
from portico.codec.writer import chunk, status_line
from portico.errors import BadResponse, ProtocolError


def feed_whole(parser: RequestParser | ResponseParser, raw: bytes) -> list[Event]:
    return parser.feed(raw)


def feed_bytewise(parser: RequestParser | ResponseParser, raw: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(raw)):
        events += parser.feed(raw[i : i + 1])
    return events


FEEDERS = [feed_whole, feed_bytewise]


def merge_data(events: list[Event]) -> list[Event]:
    """Byte-at-a-time feeding splits body data; join adjacent Data events to compare."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


# --- requests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("feed", FEEDERS)
def test_simple_get(feed) -> None:
    events = feed(RequestParser(), b"GET /a%2Fb/../c?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert kinds(events) == ["RequestHead", "EndOfMessage"]
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.method == b"GET"
    assert head.target == b"/a%2Fb/../c?x=1"  # byte for byte: no decoding, no normalising
    assert head.version == b"1.1"
    assert head.headers == [(b"Host", b"example.com")]
    assert head.host == b"example.com"
    assert head.keep_alive is True
    assert head.framing == "none"


@pytest.mark.parametrize("feed", FEEDERS)
def test_content_length_body(feed) -> None:
    raw = b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    events = merge_data(feed(RequestParser(), raw))
    assert kinds(events) == ["RequestHead", "Data", "EndOfMessage"]
    assert events[0].framing == "length" and events[0].content_length == 5
    assert events[1] == Data(b"hello")


@pytest.mark.parametrize("feed", FEEDERS)
def test_chunked_body_with_extension_and_trailer(feed) -> None:
    raw = (
        b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    events = merge_data(feed(RequestParser(), raw))
    assert kinds(events) == ["RequestHead", "Data", "EndOfMessage"]
    assert events[0].framing == "chunked"
    assert events[1] == Data(b"abcde")
    # Trailers are not mixed into the head's fields.
    assert events[0].headers == [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")]


@pytest.mark.parametrize("feed", FEEDERS)
def test_pipelined_requests_in_order(feed) -> None:
    raw = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    events = merge_data(feed(RequestParser(), raw))
    assert kinds(events) == [
        "RequestHead", "EndOfMessage",
        "RequestHead", "Data", "EndOfMessage",
        "RequestHead", "EndOfMessage",
    ]  # fmt: skip
    assert [e.target for e in events if isinstance(e, RequestHead)] == [b"/1", b"/2", b"/3"]
    assert events[-2].keep_alive is False
    assert events[-2].connection_tokens == frozenset({b"close"})


def test_http10_keep_alive_rules() -> None:
    (head, _) = RequestParser().feed(b"GET / HTTP/1.0\r\n\r\n")
    assert head.version == b"1.0" and head.keep_alive is False and head.host is None
    (head, _) = RequestParser().feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert head.keep_alive is True


def test_expect_continue_and_upgrade_flags() -> None:
    p = RequestParser()
    (head, *_rest) = p.feed(
        b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n"
    )
    assert head.expect_continue is True
    p = RequestParser()
    events = p.feed(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nRAW"
    )
    assert kinds(events) == ["RequestHead", "EndOfMessage"]
    assert events[0].upgrade is True
    assert p.upgrade_pending and p.upgrade_leftover == b"RAW"
    assert p.feed(b"MORE") == []  # held, not parsed, until the upgrade is decided
    assert p.resume() == b"RAWMORE"


BAD_REQUESTS = [
    # Smuggling: both framings, duplicate/garbled lengths, codings other than a final chunked.
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400),
    # RFC 9112 6.1: a coding the server does not implement, before a final chunked: 501.
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", 400),
    # Fields: bad names, control bytes, obs-fold, bare LF.
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\n: novalue\r\n\r\n", 400),
    # Host rules.
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: evil/a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a@evil\r\n\r\n", 400),
    # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing.
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # Versions, methods, targets.
    (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\n\r\n", 505),
    (b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: something-else\r\n\r\n", 417),
]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(("raw", "status"), BAD_REQUESTS)
def test_bad_requests_are_refused_with_status(feed, raw: bytes, status: int) -> None:
    with pytest.raises(ProtocolError) as info:
        feed(RequestParser(), raw)
    assert info.value.status == status


def test_valid_hosts_pass() -> None:
    for host in (b"a.example", b"a.example:8080", b"[::1]:80", b"127.0.0.1", b"xn--bcher-kva.ch"):
        (head, _) = RequestParser().feed(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert isinstance(head, RequestHead) and head.host == host


def test_connection_cannot_name_framing_fields() -> None:
    """Content-Length named in Connection is not a hop-by-hop option: dropping it would forward
    the body unframed (request smuggling). The proxy re-frames Transfer-Encoding itself."""
    raw = (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, X-Hop, "
           b"transfer-encoding\r\nContent-Length: 3\r\n\r\nabc")  # fmt: skip
    head = RequestParser().feed(raw)[0]
    assert isinstance(head, RequestHead)
    assert head.connection_tokens == frozenset({b"x-hop"})
    p = ResponseParser()
    p.expect(b"GET")
    resp = p.feed(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(resp[0], ResponseHead) and resp[0].connection_tokens == frozenset()


def test_limits() -> None:
    with pytest.raises(ProtocolError) as info:
        RequestParser(max_target=100).feed(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert info.value.status == 414
    with pytest.raises(ProtocolError) as info:
        RequestParser(max_header_bytes=1000).feed(
            b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 2000 + b"\r\n\r\n"
        )
    assert info.value.status == 431
    with pytest.raises(ProtocolError) as info:
        RequestParser(max_headers=3).feed(
            b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X%d: 1\r\n" % i for i in range(5))
        )
    assert info.value.status == 431
    with pytest.raises(ProtocolError) as info:
        RequestParser(max_body=10).feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n")
    assert info.value.status == 413
    p = RequestParser(max_body=10)
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n")
    with pytest.raises(ProtocolError) as info:
        p.feed(b"8\r\n12345678\r\n")
    assert info.value.status == 413


def test_endless_header_line_is_bounded_while_it_streams() -> None:
    """A header that never ends must hit the limit before the whole line has arrived."""
    p = RequestParser(max_header_bytes=1000, max_target=100)
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    with pytest.raises(ProtocolError) as info:
        for _ in range(100):
            p.feed(b"v" * 100)
    assert info.value.status == 431


def test_in_head_tracks_partial_heads() -> None:
    p = RequestParser()
    assert not p.in_head
    p.feed(b"GET / HT")
    assert p.in_head
    p.feed(b"TP/1.1\r\nHost: a\r\n\r\n")
    assert not p.in_head


# --- responses --------------------------------------------------------------------------------


def parse_response(raw: bytes, method: bytes = b"GET", feed=feed_whole) -> list[Event]:
    p = ResponseParser()
    p.expect(method)
    return merge_data(feed(p, raw))


@pytest.mark.parametrize("feed", FEEDERS)
def test_response_length_and_chunked(feed) -> None:
    events = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", feed=feed)
    assert kinds(events) == ["ResponseHead", "Data", "EndOfMessage"]
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.reason, head.framing, head.content_length) == (
        200,
        b"OK",
        "length",
        3,
    )
    events = parse_response(
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n", feed=feed
    )
    assert kinds(events) == ["ResponseHead", "Data", "EndOfMessage"]
    assert events[0].framing == "chunked" and events[1] == Data(b"ab")


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses(status: int) -> None:
    events = parse_response(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
    assert kinds(events) == ["ResponseHead", "EndOfMessage"]
    assert events[0].framing == "none"


def test_head_response_has_no_body() -> None:
    events = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", method=b"HEAD")
    assert kinds(events) == ["ResponseHead", "EndOfMessage"]
    assert events[0].content_length == 10


def test_interim_responses_then_final() -> None:
    events = parse_response(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    )
    assert [e.status for e in events if isinstance(e, ResponseHead)] == [100, 103, 200]
    assert isinstance(events[-1], EndOfMessage)


def test_close_delimited_body_ends_at_eof_only() -> None:
    p = ResponseParser()
    p.expect(b"GET")
    events = p.feed(b"HTTP/1.1 200 OK\r\n\r\npart")
    assert kinds(events) == ["ResponseHead", "Data"]
    assert events[0].framing == "close"
    assert p.feed_eof() == [EndOfMessage()]


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"",
    ],
)
def test_truncated_response_is_an_error_not_complete(raw: bytes) -> None:
    p = ResponseParser()
    p.expect(b"GET")
    p.feed(raw) if raw else None
    with pytest.raises(BadResponse):
        p.feed_eof()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTX/1.1 200 OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n",  # below 100: not interim
        b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",  # RFC 9110 15: 100..599 only
    ],
)
def test_malformed_responses(raw: bytes) -> None:
    with pytest.raises(BadResponse):
        parse_response(raw)


def test_status_range_edges_are_valid() -> None:
    assert kinds(parse_response(b"HTTP/1.1 599 Edge\r\nContent-Length: 0\r\n\r\n")) == [
        "ResponseHead",
        "EndOfMessage",
    ]
    p = ResponseParser()
    p.expect(b"GET")
    events = p.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert [e.status for e in events if isinstance(e, ResponseHead)] == [100, 200]


def test_bytes_after_complete_response_are_garbage_not_a_response() -> None:
    p = ResponseParser()
    p.expect(b"GET")
    events = p.feed(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert kinds(events) == ["ResponseHead", "EndOfMessage"]
    assert p.garbage is True
    p2 = ResponseParser()
    p2.expect(b"GET")
    p2.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert p2.complete and not p2.garbage
    p2.feed(b"X")
    assert p2.garbage


def test_upgrade_response() -> None:
    p = ResponseParser()
    p.expect(b"GET")
    events = p.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\n\r\nframe")  # fmt: skip
    assert [e.status for e in events if isinstance(e, ResponseHead)] == [101]
    assert p.upgraded and p.upgrade_leftover == b"frame"


def test_writer() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert status_line(404) == b"HTTP/1.1 404 Not Found\r\n"


# --- extension methods and header names with underscores ------------------------------------

EXTENSION_METHODS = [b"VERSION-CONTROL", b"LABEL", b"MKREDIRECTREF", b"BAN", b"PURGE", b"get"]


def feed_split_in_method(parser: RequestParser, raw: bytes) -> list[Event]:
    """Two reads, the first ending inside the method token."""
    return parser.feed(raw[:2]) + parser.feed(raw[2:])


@pytest.mark.parametrize("feed", [*FEEDERS, feed_split_in_method])
@pytest.mark.parametrize("method", EXTENSION_METHODS)
def test_extension_methods_are_parsed(feed, method: bytes) -> None:
    raw = method + b" /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    events = merge_data(feed(RequestParser(), raw))
    assert kinds(events) == ["RequestHead", "Data", "EndOfMessage"]
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.content_length) == (method, b"/x", 3)
    assert events[1] == Data(b"abc")


@pytest.mark.parametrize("feed", FEEDERS)
def test_pipelined_extension_methods_after_known_ones(feed) -> None:
    raw = (
        b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
        b"BAN /2 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"VERSION-CONTROL /4 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    events = feed(RequestParser(), raw)
    heads = [(e.method, e.target) for e in events if isinstance(e, RequestHead)]
    assert heads == [
        (b"POST", b"/1"),
        (b"BAN", b"/2"),
        (b"GET", b"/3"),
        (b"VERSION-CONTROL", b"/4"),
    ]
    assert kinds(events).count("EndOfMessage") == 4


def test_an_incomplete_method_counts_as_a_started_head() -> None:
    parser = RequestParser()
    assert parser.feed(b"VERSION-CON") == []
    assert parser.in_head  # the 408 header timer runs for it


@pytest.mark.parametrize("feed", FEEDERS)
def test_underscore_header_names_are_dropped_by_default(feed) -> None:
    raw = (
        b"GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\nMy_Header: 1\r\nX-Ok: 2\r\n\r\n"
    )
    (head, _) = feed(RequestParser(), raw)
    assert head.headers == [(b"Host", b"a"), (b"X-Ok", b"2")]
    # Allowed: they pass, except one that reads as a forwarding header Portico sets.
    (head, _) = feed(RequestParser(drop_underscores=False), raw)
    assert head.headers == [(b"Host", b"a"), (b"My_Header", b"1"), (b"X-Ok", b"2")]


def test_dropped_underscore_headers_still_count_towards_the_limits() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"A_b: 1\r\n" * 5 + b"\r\n"
    with pytest.raises(ProtocolError) as info:
        RequestParser(max_headers=4).feed(raw)
    assert info.value.status == 431
