"""The pure decisions behind static files and compression: paths, validators, conditionals,
ranges, types, Accept-Encoding negotiation, and the compress stage's choices."""

from __future__ import annotations

import gzip
import textwrap
from pathlib import Path

import brotli
import pytest
import zstandard

from portico.codec.events import RequestHead
from portico.config.load import ConfigError, load_text
from portico.policy import files
from portico.policy.encoding import choose, negotiate, parse_accept_encoding, ranked
from portico.runtime.compress import Compress, encoder
from portico.runtime.request import Headers, RequestState

# --- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/css/site.css", ["css", "site.css"]),
        (b"/", [""]),
        (b"/dir/", ["dir", ""]),
        (b"/caf%C3%A9.txt", ["café.txt"]),
        (b"/a%20b", ["a b"]),
        # refused with 400: what no honest client sends
        (b"/a%2Fb", 400),  # an encoded slash
        (b"/a%2fb", 400),
        (b"/a%5Cb", 400),  # an encoded backslash
        (b"/a\\b", 400),  # a raw backslash
        (b"/..%5C..%5Cetc", 400),
        (b"/a%00b", 400),  # NUL
        (b"/a%0Ab", 400),  # a control character
        (b"/%2e%2e/etc/passwd", 400),  # dot segments left after decoding
        (b"/a/%2E%2E/b", 400),
        (b"/a/%2e/b", 400),
        (b"/%C0%AE%C0%AE/etc", 400),  # overlong UTF-8 for '.'
        (b"/%C0%AF", 400),  # overlong UTF-8 for '/'
        (b"/%E0%80%AF", 400),  # three-byte overlong '/'
        (b"/%FF", 400),  # not UTF-8
        (b"/%zz", 400),  # a malformed escape
        (b"/a%2", 400),
        (b"relative", 400),
        # hidden names: 404 unless allowed
        (b"/.env", 404),
        (b"/.git/config", 404),
        (b"/%2egit/config", 404),
    ],
)
def test_url_segments(path: bytes, expected: list[str] | int) -> None:
    assert files.url_segments(path, allow_hidden=False) == expected


def test_hidden_names_when_allowed() -> None:
    assert files.url_segments(b"/.well-known/x", allow_hidden=True) == [".well-known", "x"]


def test_within() -> None:
    assert files.within("/srv/www/a", "/srv/www")
    assert files.within("/srv/www", "/srv/www")
    assert not files.within("/srv/www2/a", "/srv/www")  # a sibling sharing the prefix
    assert not files.within("/etc/passwd", "/srv/www")


# --- validators and conditionals ------------------------------------------------------------

TAG = files.etag(1_700_000_000_123_456_789, 1234, 42)
MTIME = 1_700_000_000
LM = files.http_date(MTIME)


def test_etag_changes_with_identity_and_coding() -> None:
    assert TAG.startswith(b'"') and TAG.endswith(b'"')
    assert files.etag(1_700_000_000_123_456_789, 1235, 42) != TAG
    assert files.etag(1_700_000_001_123_456_789, 1234, 42) != TAG
    assert files.etag(1_700_000_000_123_456_789, 1234, 43) != TAG
    assert files.etag(1_700_000_000_123_456_789, 1234, 42, "br") != TAG


def test_http_dates_round_trip_in_every_format() -> None:
    assert LM == b"Tue, 14 Nov 2023 22:13:20 GMT"
    assert files.parse_http_date(LM) == MTIME
    assert files.parse_http_date(b"Tuesday, 14-Nov-23 22:13:20 GMT") == MTIME
    assert files.parse_http_date(b"Tue Nov 14 22:13:20 2023") == MTIME
    assert files.parse_http_date(b"yesterday") is None


def pre(method: bytes = b"GET", **headers: bytes) -> int:
    hdrs = {k.replace("_", "-").encode(): v for k, v in headers.items()}
    return files.preconditions(method, hdrs, TAG, MTIME)


def test_preconditions() -> None:
    assert pre() == files.PROCEED
    # If-None-Match: weak comparison; GET/HEAD get 304, other methods 412
    assert pre(if_none_match=TAG) == 304
    assert pre(if_none_match=b"W/" + TAG) == 304
    assert pre(if_none_match=b'"other", ' + TAG) == 304
    assert pre(if_none_match=b"*") == 304
    assert pre(if_none_match=b'"other"') == files.PROCEED
    assert pre(b"HEAD", if_none_match=TAG) == 304
    assert pre(b"POST", if_none_match=TAG) == 412
    # If-Modified-Since
    assert pre(if_modified_since=LM) == 304
    assert pre(if_modified_since=files.http_date(MTIME - 1)) == files.PROCEED
    assert pre(if_modified_since=b"garbage") == files.PROCEED
    # If-None-Match takes precedence over If-Modified-Since
    assert pre(if_none_match=b'"other"', if_modified_since=LM) == files.PROCEED
    # If-Match: strong comparison
    assert pre(if_match=TAG) == files.PROCEED
    assert pre(if_match=b"*") == files.PROCEED
    assert pre(if_match=b"W/" + TAG) == 412
    assert pre(if_match=b'"other"') == 412
    # If-Unmodified-Since, ignored when If-Match is present
    assert pre(if_unmodified_since=files.http_date(MTIME - 1)) == 412
    assert pre(if_unmodified_since=LM) == files.PROCEED
    assert pre(if_match=TAG, if_unmodified_since=files.http_date(MTIME - 1)) == files.PROCEED
    # 412 from If-Match wins over a 304 from If-None-Match
    assert pre(if_match=b'"x"', if_none_match=TAG) == 412


def test_if_range() -> None:
    assert files.if_range_holds(TAG, TAG, LM)
    assert not files.if_range_holds(b'"other"', TAG, LM)
    assert not files.if_range_holds(b"W/" + TAG, TAG, LM)  # weak tags never match
    assert files.if_range_holds(LM, TAG, LM)
    assert not files.if_range_holds(files.http_date(MTIME + 10), TAG, LM)


# --- ranges -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"bytes=0-99", [(0, 99)]),
        (b"bytes=100-", [(100, 999)]),
        (b"bytes=-100", [(900, 999)]),
        (b"bytes=-5000", [(0, 999)]),
        (b"bytes=990-5000", [(990, 999)]),
        (b"BYTES=0-0", [(0, 0)]),
        (b"bytes=0-9, 500-509", [(0, 9), (500, 509)]),
        (b"bytes=500-509,0-9", [(0, 9), (500, 509)]),  # sorted
        (b"bytes=0-9,5-20", [(0, 20)]),  # overlapping: merged
        (b"bytes=0-9,50-59", [(0, 59)]),  # close: merged (a part header costs as much)
        (b"bytes=0-9,1000-1010", [(0, 9)]),  # the unsatisfiable one is dropped
        (b"bytes=1000-", files.UNSATISFIABLE),
        (b"bytes=-0", files.UNSATISFIABLE),
        (b"bytes=5-1", None),  # invalid: the header is ignored
        (b"bytes=abc", None),
        (b"bytes=1-2-3", None),
        (b"items=0-9", None),
        (b"bytes=", None),
        (b"0-9", None),
    ],
)
def test_parse_ranges(value: bytes, expected: object) -> None:
    assert files.parse_ranges(value, 1000) == expected


def test_empty_file_ranges_are_unsatisfiable() -> None:
    assert files.parse_ranges(b"bytes=0-", 0) == files.UNSATISFIABLE
    assert files.parse_ranges(b"bytes=-5", 0) == files.UNSATISFIABLE


def test_range_lists_are_never_amplified() -> None:
    size = 10_000_000
    # thousands of overlapping ranges: coalesced into one, never more bytes than the file
    overlapping = b"bytes=" + b",".join(b"0-%d" % (size - 1) for _ in range(150))
    assert files.parse_ranges(overlapping, size) == [(0, size - 1)]
    # many small ranges far apart: more parts than allowed, so the header is ignored
    spread = b"bytes=" + b",".join(b"%d-%d" % (i * 1000, i * 1000) for i in range(100))
    assert files.parse_ranges(spread, size) is None
    # a list longer than anything sensible is not even parsed
    huge = b"bytes=" + b",".join(b"0-0" for _ in range(files.MAX_RANGE_SPECS + 1))
    assert files.parse_ranges(huge, size) is None
    # small ranges close together coalesce instead
    close = b"bytes=" + b",".join(b"%d-%d" % (i * 10, i * 10) for i in range(150))
    assert files.parse_ranges(close, size) == [(0, 1490)]


# --- types, cache rules -----------------------------------------------------------------------


def test_content_types() -> None:
    assert files.content_type("a.css", {}, "utf-8") == b"text/css; charset=utf-8"
    assert files.content_type("a.HTML", {}, "utf-8") == b"text/html; charset=utf-8"
    assert files.content_type("a.js", {}, "utf-8") == b"text/javascript; charset=utf-8"
    assert files.content_type("a.json", {}, "utf-8") == b"application/json"
    assert files.content_type("a.png", {}, "utf-8") == b"image/png"
    assert files.content_type("a.svg", {}, "utf-8") == b"image/svg+xml; charset=utf-8"
    assert files.content_type("a.woff2", {}, "utf-8") == b"font/woff2"
    assert files.content_type("noext", {}, "utf-8") == b"application/octet-stream"
    assert files.content_type("a.txt", {}, "") == b"text/plain"
    assert files.content_type("a.foo", {".foo": "text/x-foo"}, "latin-1") == (
        b"text/x-foo; charset=latin-1"
    )


def test_cache_rules_first_match_wins() -> None:
    rules = [("/assets/*", b"immutable"), ("*.html", b"no-cache")]
    assert files.cache_control(rules, "/assets/app.123.js") == b"immutable"
    assert files.cache_control(rules, "/deep/page.html") == b"no-cache"
    assert files.cache_control(rules, "/img.png") is None


# --- Accept-Encoding ----------------------------------------------------------------------------

OFFER = ("zstd", "br", "gzip")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),  # no header: identity
        (b"", None),
        (b"gzip", "gzip"),
        (b"gzip, deflate, br", "br"),  # ties: the server's order
        (b"gzip, deflate, br, zstd", "zstd"),
        (b"br;q=0.5, gzip;q=0.8", "gzip"),  # q decides
        (b"br;q=0, gzip", "gzip"),
        (b"gzip;q=0", None),
        (b"*", "zstd"),
        (b"*;q=0.5, gzip", "gzip"),
        (b"*, br;q=0", "zstd"),
        (b"x-gzip", "gzip"),
        (b"GZIP", "gzip"),
        (b"identity", None),
        (b"gzip;q=0.5, identity", None),  # identity named higher: sent as is
        (b"deflate", None),
        (b"gzip;q=2", None),  # an invalid q drops that element
        (b"gzip;q=0.1234", None),
        (b"br;q=0.001, gzip;q=0.0001", "br"),
    ],
)
def test_negotiation(header: bytes | None, expected: str | None) -> None:
    values = [] if header is None else [header]
    assert negotiate(values, OFFER) == expected


def test_several_header_fields_combine() -> None:
    assert parse_accept_encoding([b"gzip;q=0.2", b"br"]) == {"gzip": 0.2, "br": 1.0}
    assert choose(parse_accept_encoding([b"gzip;q=0.2", b"br"]), ("gzip", "br")) == "br"


def test_ranked_for_precompressed_siblings() -> None:
    accepted = parse_accept_encoding([b"gzip, br;q=0.9, zstd;q=0"])
    assert ranked(accepted, OFFER) == ["gzip", "br"]
    assert ranked(None, OFFER) == []


# --- the compress stage -------------------------------------------------------------------------


def request(accept: bytes | None = b"gzip", method: bytes = b"GET") -> RequestState:
    headers = [(b"Host", b"x")] + ([(b"Accept-Encoding", accept)] if accept is not None else [])
    head = RequestHead(
        method, b"/", b"1.1", headers, host=b"x", keep_alive=True, framing="none",
        content_length=None, connection_tokens=frozenset(), expect_continue=False, upgrade=False,
    )
    return RequestState(head, b"/", b"x", "127.0.0.1", False, b"http", 0.0)


def stage(**kw: object) -> Compress:
    args: dict[str, object] = {
        "codings": OFFER, "levels": {}, "min_size": 100, "types": ("text/*", "application/json")
    }
    args.update(kw)
    return Compress(**args)  # type: ignore[arg-type]


def response(**extra: bytes) -> Headers:
    headers: Headers = [
        (b"Content-Type", b"text/html; charset=utf-8"),
        (b"Content-Length", b"5000"),
        (b"ETag", b'"abc"'),
        (b"Accept-Ranges", b"bytes"),
    ]
    headers += [(k.replace("_", "-").encode(), v) for k, v in extra.items()]
    return headers


def names(headers: Headers) -> dict[bytes, bytes]:
    return {n.lower(): v for n, v in headers}


def test_compress_edits_the_head() -> None:
    headers = response()
    f = stage().body_filter(request(b"gzip"), 200, headers)
    assert f is not None
    h = names(headers)
    assert h[b"content-encoding"] == b"gzip"
    assert h[b"vary"] == b"Accept-Encoding"
    assert h[b"etag"] == b'W/"abc"'
    assert b"content-length" not in h and b"accept-ranges" not in h
    body = b"hello world " * 1000
    out = f.feed(body[:5000]) + f.feed(body[5000:]) + f.end()
    assert gzip.decompress(out) == body


@pytest.mark.parametrize(
    ("status", "method", "extra", "accept"),
    [
        (206, b"GET", {}, b"gzip"),
        (204, b"GET", {}, b"gzip"),
        (304, b"GET", {}, b"gzip"),
        (200, b"HEAD", {}, b"gzip"),
        (200, b"GET", {"Content_Encoding": b"br"}, b"gzip"),
        (200, b"GET", {"Cache_Control": b"public, no-transform"}, b"gzip"),
    ],
)
def test_never_compressed(
    status: int, method: bytes, extra: dict[str, bytes], accept: bytes
) -> None:
    headers = response(**extra)
    before = list(headers)
    assert stage().body_filter(request(accept, method), status, headers) is None
    assert headers == before


def test_not_compressed_but_varies() -> None:
    # small, or a client that does not accept: sent as is, but a cache must know it varies
    for headers, accept in ((response(), None), (response(), b"identity")):
        assert stage().body_filter(request(accept), 200, headers) is None
        assert names(headers)[b"vary"] == b"Accept-Encoding"
        assert names(headers)[b"etag"] == b'"abc"'
    small = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"99")]
    assert stage().body_filter(request(), 200, small) is None
    image = [(b"Content-Type", b"image/png"), (b"Content-Length", b"99999")]
    assert stage().body_filter(request(), 200, image) is None
    assert b"vary" not in names(image)


def test_vary_is_extended_not_duplicated() -> None:
    headers = response(Vary=b"Origin")
    stage().body_filter(request(), 200, headers)
    assert names(headers)[b"vary"] == b"Origin, Accept-Encoding"
    headers = response(Vary=b"accept-encoding")
    stage().body_filter(request(), 200, headers)
    assert [v for n, v in headers if n.lower() == b"vary"] == [b"accept-encoding"]


def test_unknown_length_is_compressed() -> None:
    headers = [(b"Content-Type", b"text/event-stream")]
    assert stage().body_filter(request(b"br"), 200, headers) is not None


@pytest.mark.parametrize("coding", OFFER)
def test_every_encoder_flushes_each_chunk(coding: str) -> None:
    """What a chunk fed in decodes to must be available before the next one comes: SSE."""
    f = encoder(coding, 3)
    events = [b"data: %d\n\n" % i for i in range(5)]
    if coding == "gzip":
        import zlib

        d = zlib.decompressobj(31)
        for ev in events:
            assert d.decompress(f.feed(ev)) == ev
        assert d.decompress(f.end()) == b""
    elif coding == "br":
        bd = brotli.Decompressor()
        for ev in events:
            assert bd.process(f.feed(ev)) == ev
        bd.process(f.end())
        assert bd.is_finished()
    else:
        zd = zstandard.ZstdDecompressor().decompressobj()
        for ev in events:
            assert zd.decompress(f.feed(ev)) == ev
        zd.decompress(f.end())
        assert zd.eof


# --- config -------------------------------------------------------------------------------------


def config(route: str) -> str:
    return textwrap.dedent(
        """
        [upstreams.app]
        backends = ["http://127.0.0.1:5001"]

        [[routes]]
        """
    ) + textwrap.dedent(route)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_text(text)
    return str(e.value)


def test_acceptance_example_loads(tmp_path: Path) -> None:
    cfg = load_text(
        config(
            f"""
            path = "/static/"
            strip_prefix = "/static"
            static = {{ root = "{tmp_path}" }}

            [[routes]]
            path = "/"
            upstream = "app"
            compress = true
            """
        )
    )
    assert cfg.routes[0].static is not None and cfg.routes[1].compress is not None


@pytest.mark.parametrize(
    ("route", "key", "reason"),
    [
        ('static = { root = "/nonexistent/x" }', "routes[0].static.root", "does not exist"),
        ('static = { root = "relative" }', "routes[0].static.root", "absolute"),
        ('static = { root = "/etc/hostname" }', "routes[0].static.root", "not a directory"),
        ('static = { root = "/tmp", index = ["a/b.html"] }', "routes[0].static.index", "'/'"),
        ("static = { }", "routes[0].static", "one of root or alias"),
        ('static = { root = "/tmp", precompressed = ["lzma"] }', "routes[0].static", "lzma"),
        ('upstream = "app"\ncompress = { encodings = ["deflate"] }', "routes[0].compress", ""),
        ('upstream = "app"\ncompress = { levels = { gzip = 10 } }', "routes[0].compress", "9"),
        ('upstream = "app"\ncompress = { levels = { br = 12 } }', "routes[0].compress", "11"),
        ('upstream = "app"\ncompress = { types = ["html"] }', "routes[0].compress", "type"),
        ('upstream = "app"\nstatic = { root = "/tmp" }', "routes[0]", "exactly one"),
        (
            'static = { root = "/tmp", fallback_upstream = "nope" }',
            "routes[0].static.fallback_upstream",
            "no upstream",
        ),
        (
            'path = "/s/"\nstrip_prefix = "/s"\nstatic = { alias = "/tmp" }',
            "routes[0]",
            "strip_prefix",
        ),
    ],
)
def test_bad_static_and_compress_config(route: str, key: str, reason: str) -> None:
    message = error_of(config(route))
    assert key in message, message
    assert reason in message, message


def test_heads_never_compressed_still_say_they_vary() -> None:
    """206, HEAD and 304 carry the Vary a 200 would (RFC 9110 15.3.7, RFC 9111 4.3.4)."""
    for status, method in ((206, b"GET"), (200, b"HEAD")):
        headers = response()
        stage().on_response(request(b"gzip", method), status, headers)
        assert names(headers)[b"vary"] == b"Accept-Encoding"
        assert names(headers)[b"etag"] == b'"abc"'
    not_modified: Headers = [(b"ETag", b'"abc"')]
    stage().on_response(request(b"gzip"), 304, not_modified)
    assert names(not_modified) == {b"etag": b'W/"abc"', b"vary": b"Accept-Encoding"}
    not_modified = [(b"ETag", b'"abc"')]
    stage().on_response(request(None), 304, not_modified)
    assert names(not_modified)[b"etag"] == b'"abc"'  # this client gets identity: strong
    image = [(b"Content-Type", b"image/png")]
    stage().on_response(request(b"gzip"), 206, image)
    assert b"vary" not in names(image)


def test_isal_gzip_engine_flushes_each_chunk_and_decodes_as_gzip() -> None:
    import zlib

    f = encoder("gzip", 2, "isal")
    d = zlib.decompressobj(31)
    for i in range(5):
        event = b"data: %d\n\n" % i
        assert d.decompress(f.feed(event)) == event
    d.decompress(f.end())
    assert d.eof
    # and it is ISA-L at work, not zlib under another name
    body = b'{"id": 1, "name": "user"}, ' * 2000
    isal_out = encoder("gzip", 2, "isal").feed(body)
    zlib_out = encoder("gzip", 2, "zlib").feed(body)
    assert isal_out != zlib_out
    assert zlib.decompressobj(31).decompress(isal_out) == body


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        ('compress = { gzip_engine = "isal", levels = { gzip = 6 } }', "isal's levels are 0-3"),
        ("compress = { levels = { gzip = 0 } }", "zlib's levels are 1-9"),
        ('compress = { gzip_engine = "pigz" }', "gzip_engine"),
    ],
)
def test_gzip_engine_config(route: str, reason: str) -> None:
    message = error_of(config('upstream = "app"\n' + route))
    assert "routes[0].compress" in message and reason in message, message
