"""Request smuggling and strict parsing, over real sockets.

Every malformed request shape is sent to a real portico in front of a ``RawBackend`` that
records every byte it receives. Each case checks three things: the client gets the exact
status with ``Connection: close`` and nothing after it, the client connection is then closed,
and the backend saw nothing of it (for a body that goes bad after its head was forwarded: no
complete request, and the upstream connection was closed under it).

One proxy and one backend serve the whole module; cases run one after another, so "what the
backend received during this case" is the difference between two snapshots.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from tests.support.backends import RawBackend, echo_http
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection, RawResponse, build_request, chunked
from tests.support.waiting import wait_until

# Small limits, so each limit is cheap to cross.
MAX_REQUEST_LINE = 512
MAX_HEADER_BYTES = 4096
MAX_HEADERS = 30
MAX_BODY_BYTES = 64


@pytest.fixture(scope="module")
def backend() -> Iterator[RawBackend]:
    with RawBackend(echo_http()) as raw:
        yield raw


@pytest.fixture(scope="module")
def proxy(backend: RawBackend) -> Iterator[PorticoProcess]:
    config = {
        "server": {
            "limits": {
                "max_request_line": MAX_REQUEST_LINE,
                "max_header_bytes": MAX_HEADER_BYTES,
                "max_headers": MAX_HEADERS,
                "max_body_bytes": MAX_BODY_BYTES,
            },
            "shutdown_grace": 1,
        },
        "upstreams": {"app": {"backends": [backend.url]}},
    }
    with PorticoProcess(config) as proc:
        yield proc


# --- helpers --------------------------------------------------------------------------------


def new_bytes(backend: RawBackend, before: list[bytes]) -> dict[int, bytes]:
    """Backend connection index -> the bytes it received after the ``before`` snapshot, for
    the connections that received any."""
    now = backend.received
    new = {i: data[len(before[i]) :] if i < len(before) else data for i, data in enumerate(now)}
    return {i: d for i, d in new.items() if d}


def received_since(backend: RawBackend, before: list[bytes]) -> list[bytes]:
    """The bytes each backend connection received after the ``before`` snapshot."""
    return list(new_bytes(backend, before).values())


def refused(proxy: PorticoProcess, data: bytes, status: int) -> RawResponse:
    """Send ``data`` in one write; expect exactly one ``status`` answer, then a closed
    connection with nothing more on it."""
    with RawConnection(proxy.port, timeout=5.0) as conn:
        conn.send(data)
        response = conn.recv_response()
        assert response.status == status, response.raw
        assert response.header("Connection") == "close", response.raw
        assert conn.closed(timeout=3.0), "portico kept the connection open after refusing"
        assert conn.pending == b"", f"bytes after the error response: {conn.pending!r}"
    return response


def assert_proxy_still_serves(proxy: PorticoProcess) -> None:
    with RawConnection(proxy.port) as conn:
        response = conn.request("GET", "/still-alive")
    assert response.status == 200
    assert response.json()["target"] == "/still-alive"


# --- malformed requests, each sent in one write ---------------------------------------------

H = b"Host: a.example\r\n"

MALFORMED: list[tuple[str, bytes, int]] = [
    # Content-Length and Transfer-Encoding together, in both orders.
    ("cl-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", 400),
    ("te-cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Content-Length: 6\r\n\r\n0\r\n\r\nX", 400),
    # Repeated or malformed Content-Length.
    ("cl-twice-equal", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
     b"Content-Length: 3\r\n\r\nabc", 400),
    ("cl-twice-different", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
     b"Content-Length: 5\r\n\r\nabc", 400),
    ("cl-list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-hex", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", 400),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    ("cl-empty", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n\r\n", 400),
    # Transfer codings other than one final chunked.
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n"
     b"\r\n0\r\n\r\n", 501),
    ("te-chunked-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n"
     b"\r\n0\r\n\r\n", 400),
    ("te-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n", 400),
    ("te-gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    ("te-twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-chunked-then-identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n", 400),
    ("te-space-before-colon", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n"
     b"\r\n0\r\n\r\n", 400),
    ("te-xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n"
     b"\r\n0\r\n\r\n", 400),
    # RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing.
    ("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n", 400),
    # Bad chunk sizes and chunk data that overruns its size.
    ("chunk-size-not-hex", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-negative", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"-3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-0x", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"0x3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-overflow", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"10000000000000003\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-bare-lf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"3\nabc\n0\n\n", 400),
    ("chunk-extension-ctl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"3;a=\x01\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-data-overrun", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabcdef\r\n0\r\n\r\n", 400),
    ("chunk-data-no-crlf", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc0\r\n\r\n", 400),
    # Invalid field names and values.
    ("name-with-space", b"GET / HTTP/1.1\r\n" + H + b"Bad Name: x\r\n\r\n", 400),
    ("name-space-before-colon", b"GET / HTTP/1.1\r\n" + H + b"X-Foo : x\r\n\r\n", 400),
    ("name-empty", b"GET / HTTP/1.1\r\n" + H + b": x\r\n\r\n", 400),
    ("name-del", b"GET / HTTP/1.1\r\n" + H + b"X\x7f: x\r\n\r\n", 400),
    ("name-non-ascii", b"GET / HTTP/1.1\r\n" + H + b"X-\xe9: x\r\n\r\n", 400),
    ("value-nul", b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400),
    ("value-cr-inside", b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", 400),
    ("value-ctl", b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n", 400),
    ("value-del", b"GET / HTTP/1.1\r\n" + H + b"X: a\x7f\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n folded\r\n\r\n", 400),
    ("first-field-folded", b"GET / HTTP/1.1\r\n Host: a.example\r\n\r\n", 400),
    ("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: a.example\n\n", 400),
    ("bare-lf-one-field", b"GET / HTTP/1.1\r\n" + H + b"X: a\nY: b\r\n\r\n", 400),
    ("bare-cr-ends-field", b"GET / HTTP/1.1\r\nHost: a.example\rX: b\r\n\r\n", 400),
    # Host rules (RFC 9112 3.2).
    ("host-missing", b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    ("host-twice", b"GET / HTTP/1.1\r\n" + H + b"Host: b.example\r\n\r\n", 400),
    ("host-twice-http10", b"GET / HTTP/1.0\r\n" + H + b"Host: b.example\r\n\r\n", 400),
    ("host-with-space", b"GET / HTTP/1.1\r\nHost: a.example evil.example\r\n\r\n", 400),
    ("host-with-slash", b"GET / HTTP/1.1\r\nHost: evil.example/a.example\r\n\r\n", 400),
    ("host-with-userinfo", b"GET / HTTP/1.1\r\nHost: a.example@evil.example\r\n\r\n", 400),
    # Versions, methods, request lines.
    ("http-2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("http-0.9-version", b"GET / HTTP/0.9\r\n\r\n", 505),
    ("http-0.9-simple", b"GET /\r\n\r\n", 505),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("http-1.2", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    ("version-lowercase", b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    ("version-garbage", b"GET / HTTX/1.1\r\n" + H + b"\r\n", 400),
    ("version-trailing-space", b"GET / HTTP/1.1 \r\n" + H + b"\r\n", 400),
    ("method-invalid", b"G@T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    # (A lower-case "get" is a valid extension method, RFC 9110 9.1: it is forwarded as is.)
    ("connect", b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n", 501),
    ("expect-unknown", b"GET / HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\n\r\n", 417),
    # Limits.
    ("target-too-long", b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("header-block-too-large", b"GET / HTTP/1.1\r\n" + H + b"X-Big: "
     + b"v" * MAX_HEADER_BYTES + b"\r\n\r\n", 431),
    ("many-fields-too-large", b"GET / HTTP/1.1\r\n" + H
     + b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 200) for i in range(25)) + b"\r\n", 431),
    ("too-many-headers", b"GET / HTTP/1.1\r\n" + H
     + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", 431),
    ("body-declared-too-large", b"POST / HTTP/1.1\r\n" + H
     + b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1), 413),
    ("chunked-body-too-large", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
     + chunked([b"x" * 40, b"y" * 40]), 413),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "status"),
    [(raw, status) for _, raw, status in MALFORMED],
    ids=[i for i, _, _ in MALFORMED],
)
def test_malformed_request_is_refused_and_never_forwarded(
    proxy: PorticoProcess, backend: RawBackend, raw: bytes, status: int
) -> None:
    before = backend.received
    refused(proxy, raw, status)
    assert received_since(backend, before) == []


def test_limits_are_exactly_at_the_configured_values(
    proxy: PorticoProcess, backend: RawBackend
) -> None:
    """Just under each limit passes; the counterpart over it is refused (above)."""
    target = b"/" + b"t" * (MAX_REQUEST_LINE - 1)
    body = b"b" * MAX_BODY_BYTES
    fields = [(f"X-{i}", "1") for i in range(MAX_HEADERS - 1)]  # plus Host
    with RawConnection(proxy.port) as conn:
        conn.send(build_request("GET", target.decode()))
        assert conn.recv_response().json()["target"] == target.decode()
        conn.send(build_request("POST", "/at-limit", body=body))
        assert conn.recv_response().json()["body_length"] == MAX_BODY_BYTES
        conn.send(build_request("POST", "/at-limit", {"Transfer-Encoding": "chunked"},
                                chunked([body[:30], body[30:]])))  # fmt: skip
        assert conn.recv_response().json()["body_length"] == MAX_BODY_BYTES
        conn.send(build_request("GET", "/fields", fields))
        echoed = conn.recv_response().json()
    names = [name for name, _ in echoed["headers"]]
    assert names[:MAX_HEADERS] == ["Host"] + [f"X-{i}" for i in range(MAX_HEADERS - 1)]


# --- bodies that go bad after the head was forwarded ----------------------------------------


def _forwarded_head_then(
    proxy: PorticoProcess, backend: RawBackend, head: bytes, first: bytes, bad: bytes, status: int
) -> bytes:
    """Send ``head + first``, wait until the backend has it, then ``bad``. Returns what the
    backend received on the connection that carried the request, once that closed."""
    before = backend.received
    with RawConnection(proxy.port) as conn:
        conn.send(head + first)
        # The head (and the first chunk) is forwarded before the body ends: that is streaming.
        wait_until(lambda: b"".join(received_since(backend, before)).count(b"\r\n\r\n") >= 1,
                   message="the request head to reach the backend")  # fmt: skip
        conn.send(bad)
        response = conn.recv_response()
        assert response.status == status, response.raw
        assert response.header("Connection") == "close"
        assert conn.closed(timeout=3.0)
        assert conn.pending == b""
    new = new_bytes(backend, before)
    assert len(new) == 1, new
    [(index, _)] = new.items()
    record = backend.records[index]
    wait_until(lambda: record.closed, message="portico to close the upstream connection")
    return new_bytes(backend, before)[index]


def test_bad_chunk_after_forwarded_head_aborts_the_upstream_request(
    proxy: PorticoProcess, backend: RawBackend
) -> None:
    head = b"POST /stream HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    seen = _forwarded_head_then(proxy, backend, head, b"4\r\ngood\r\n", b"zz\r\nbad\r\n", 400)
    assert seen.startswith(b"POST /stream HTTP/1.1\r\n")
    assert seen.count(b" HTTP/1.1\r\n") == 1
    # Never a last chunk: the backend cannot take the truncated body for a complete request.
    assert not seen.endswith(b"0\r\n\r\n"), seen
    assert b"bad" not in seen


def test_streamed_chunked_body_over_limit_gets_413_and_aborts_upstream(
    proxy: PorticoProcess, backend: RawBackend
) -> None:
    head = b"POST /big HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    first = b"%x\r\n%s\r\n" % (MAX_BODY_BYTES - 4, b"a" * (MAX_BODY_BYTES - 4))
    seen = _forwarded_head_then(proxy, backend, head, first, b"8\r\nbbbbbbbb\r\n0\r\n\r\n", 413)
    assert seen.startswith(b"POST /big HTTP/1.1\r\n")
    assert b"b" * 8 not in seen
    assert not seen.endswith(b"0\r\n\r\n"), seen


# --- pipelined requests smuggled behind others ----------------------------------------------


def test_request_smuggled_after_a_bad_one_never_reaches_the_backend(
    proxy: PorticoProcess, backend: RawBackend
) -> None:
    smuggled = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
    for bad in (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        b"0\r\n\r\n",
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nContent-Length: 44\r\n\r\n",
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n folded\r\n\r\n",
    ):
        before = backend.received
        refused(proxy, bad + smuggled, 501 if b"gzip" in bad else 400)
        assert received_since(backend, before) == [], bad
    assert_proxy_still_serves(proxy)


def test_bad_request_pipelined_after_a_good_one(proxy: PorticoProcess, backend: RawBackend) -> None:
    """The good request is answered first, in order; then the bad one ends the connection
    with 400, and neither it nor the request hidden behind it reaches the backend."""
    good = b"GET /good HTTP/1.1\r\n" + H + b"\r\n"
    bad = b"POST /bad HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 30\r\n\r\nabc"
    smuggled = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
    before = backend.received
    with RawConnection(proxy.port) as conn:
        conn.send(good + bad + smuggled)
        responses = [conn.recv_response(), conn.recv_response()]
        assert [r.status for r in responses] == [200, 400]
        assert conn.closed(timeout=3.0)
        assert conn.pending == b""
    seen = b"".join(received_since(backend, before))
    assert b"/bad" not in seen and b"/smuggled" not in seen
    assert seen.count(b" HTTP/1.1\r\n") == 1


def assert_backend_parsed_two(upload: dict[str, object], after: dict[str, object]) -> None:
    """The echo backend (a real parser) read exactly two requests, back to back, on one
    connection: the upload and the request after it, nothing in between."""
    assert after["connection"] == upload["connection"]
    assert after["request_number"] == upload["request_number"] + 1  # type: ignore[operator]


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_request_hidden_in_a_body_is_forwarded_as_that_body(
    proxy: PorticoProcess, backend: RawBackend, framing: str
) -> None:
    """A valid request whose body looks like a request end plus another request is one
    request: the backend gets exactly the body bytes, and the next real request is the next."""
    body = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
    assert len(body) <= MAX_BODY_BYTES
    if framing == "chunked":
        first = build_request("POST", "/upload", {"Transfer-Encoding": "chunked"},
                              chunked([body[:7], body[7:]]))  # fmt: skip
    else:
        first = build_request("POST", "/upload", body=body)
    second = build_request("GET", "/after")
    before = backend.received
    with RawConnection(proxy.port) as conn:
        conn.send(first + second)
        upload = conn.recv_response().json()
        after = conn.recv_response().json()
    assert upload["method"] == "POST" and upload["target"] == "/upload"
    assert upload["body_length"] == len(body)
    assert upload["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert upload["chunked"] is (framing == "chunked")
    assert after["target"] == "/after"
    assert_backend_parsed_two(upload, after)
    seen = b"".join(received_since(backend, before))
    assert seen.count(b"/smuggled") == 1  # inside the forwarded body, once


def test_connection_header_cannot_strip_content_length(
    proxy: PorticoProcess, backend: RawBackend
) -> None:
    """``Connection: content-length`` must not make portico forward the body without its
    framing: the backend would read the body as a second, smuggled request."""
    body = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
    first = build_request("POST", "/upload", {"Connection": "content-length"}, body=body)
    before = backend.received
    with RawConnection(proxy.port) as conn:
        conn.send(first + build_request("GET", "/after"))
        upload = conn.recv_response().json()
        after = conn.recv_response().json()
    assert (upload["target"], upload["body_length"]) == ("/upload", len(body)), (
        "portico dropped Content-Length because Connection named it"
    )
    assert after["target"] == "/after"
    assert_backend_parsed_two(upload, after)
    seen = b"".join(received_since(backend, before))
    assert seen.count(b"/smuggled") == 1  # inside the forwarded body, once


def test_refused_requests_do_not_disturb_other_clients(proxy: PorticoProcess) -> None:
    """A client in the middle of a keep-alive session is unaffected by another's bad request."""
    with RawConnection(proxy.port) as good:
        assert good.request("GET", "/one").status == 200
        refused(proxy, b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2"
                b"\r\n\r\n", 400)  # fmt: skip
        assert good.request("GET", "/two").json()["target"] == "/two"
