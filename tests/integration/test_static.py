"""Static routes over real sockets: files from a temp directory served by a real Portico.

One Portico (module-scoped) serves several static routes over one tree of real files, plus a
proxied route with compression in front of a raw backend. Each test speaks raw HTTP/1.1
(``RawConnection``) so that framing, headers and lengths are checked byte for byte.
"""

from __future__ import annotations

import asyncio
import email.parser
import gzip
import json
import os
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import brotli
import pytest
import zstandard

from tests.support.backends import RawBackend
from tests.support.behaviours import read_request
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection, RawResponse, build_request

CSS = b"body { color: red; }\n" * 100  # 2100 bytes: above compress.min_size
DIGITS = bytes(i % 10 + 48 for i in range(1000))
APP_BODY = b"from the app\n"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("static")
    root = base / "www"
    (root / "css").mkdir(parents=True)
    (root / "css" / "site.css").write_bytes(CSS)
    (root / "digits.txt").write_bytes(DIGITS)
    (root / "index.html").write_bytes(b"<h1>home</h1>\n")
    (root / "docs").mkdir()
    (root / "docs" / "index.html").write_bytes(b"<h1>docs</h1>\n")
    (root / "empty").mkdir()
    (root / "listed").mkdir()
    (root / "listed" / "a <b>.txt").write_bytes(b"a")
    (root / "listed" / ".hidden").write_bytes(b"h")
    (root / "listed" / "sub").mkdir()
    (root / ".env").write_bytes(b"SECRET=1\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(b"[core]\n")
    (root / "a\\b").write_bytes(b"backslash name\n")
    (root / "app.js").write_bytes(b"console.log('plain');\n" * 50)
    (root / "app.js.gz").write_bytes(gzip.compress((root / "app.js").read_bytes()))
    (root / "app.js.br").write_bytes(brotli.compress((root / "app.js").read_bytes()))
    (root / "assets").mkdir()
    (root / "assets" / "app.3f2a.js").write_bytes(b"hashed();\n")
    # symlinks: one inside the root, two leading out of it
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"outside secret\n")
    (root / "inside-link.txt").symlink_to(root / "digits.txt")
    (root / "out-link.txt").symlink_to(outside / "secret.txt")
    (root / "out-dir").symlink_to(outside, target_is_directory=True)
    (base / "www-sibling").mkdir()
    (base / "www-sibling" / "x.txt").write_bytes(b"sibling\n")
    (root / "spa").mkdir()
    (root / "spa" / "index.html").write_bytes(b"<app/>\n")
    return root


def app_handler() -> Any:
    """A small correct origin: Date, a strong ETag, and If-None-Match answered with 304
    (weak comparison, RFC 9110 13.1.2), so a weakened tag from the compress stage still
    validates, as it does with Flask/Werkzeug."""
    body = b"<p>" + b"hello from the app " * 200 + b"</p>\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            common = (
                b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
                b'ETag: "v1"\r\nCache-Control: max-age=60\r\n'
            )
            inm = req.header("if-none-match") or ""
            if '"v1"' in inm:
                writer.write(b"HTTP/1.1 304 Not Modified\r\n" + common + b"\r\n")
            else:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n" + common
                    + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            await writer.drain()

    return handler


@pytest.fixture(scope="module")
def backend() -> Iterator[RawBackend]:
    b = RawBackend(app_handler())
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def portico(tree: Path, backend: RawBackend) -> Iterator[PorticoProcess]:
    root = str(tree)
    config: dict[str, Any] = {
        "upstreams": {"app": {"backends": [backend.url]}},
        "routes": [
            {
                "path": "/s/",
                "strip_prefix": "/s",
                "static": {
                    "root": root,
                    "precompressed": True,
                    "cache_control": {"/assets/*": "public, max-age=31536000, immutable"},
                },
            },
            {"path": "/alias/", "static": {"alias": root + "/docs"}},
            {
                "path": "/r/",
                "strip_prefix": "/r",
                "static": {"root": root, "cache_control": {"*": "max-age=60"}},
            },
            {"path": "/list/", "strip_prefix": "/list", "static": {"root": root, "listing": True}},
            {
                "path": "/spa/",
                "strip_prefix": "/spa",
                "static": {"root": root + "/spa", "fallback": "/index.html"},
            },
            {
                "path": "/try/",
                "strip_prefix": "/try",
                "static": {"root": root, "fallback_upstream": "app"},
            },
            {
                "path": "/links/",
                "strip_prefix": "/links",
                "static": {"root": root, "symlinks_outside": True},
            },
            {"path": "/c/", "strip_prefix": "/c", "static": {"root": root}, "compress": True},
            {
                "path": "/rc/",
                "strip_prefix": "/rc",
                "static": {"root": root, "cache_control": {"*": "max-age=60"}},
                "compress": True,
            },
            {
                "path": "/isal/",
                "upstream": "app",
                "compress": {"encodings": ["gzip"], "gzip_engine": "isal"},
            },
            {"path": "/", "upstream": "app", "compress": True},
        ],
    }
    proc = PorticoProcess(config).start()
    yield proc
    proc.stop()


def get(portico: PorticoProcess, target: str, method: str = "GET", **headers: str) -> RawResponse:
    hdrs = [(k.replace("_", "-"), v) for k, v in headers.items()]
    with RawConnection(portico.port) as conn:
        return conn.request(method, target, hdrs)


# --- files, index, types ------------------------------------------------------------------------


def test_a_file_with_validators(portico: PorticoProcess) -> None:
    r = get(portico, "/s/css/site.css")
    assert r.status == 200
    assert r.body == CSS
    assert r.header("Content-Type") == "text/css; charset=utf-8"
    assert r.header("Content-Length") == str(len(CSS))
    assert r.header("Accept-Ranges") == "bytes"
    etag = r.header("ETag")
    assert etag is not None and etag.startswith('"')
    assert r.header("Last-Modified", ) is not None and r.header("Date") is not None


def test_index_and_directory_redirect(portico: PorticoProcess) -> None:
    assert get(portico, "/s/").body == b"<h1>home</h1>\n"
    assert get(portico, "/s/docs/").body == b"<h1>docs</h1>\n"
    r = get(portico, "/s/docs?x=1")
    assert r.status == 301
    assert r.header("Location") == "/s/docs/?x=1"  # the client's path, prefix included
    assert get(portico, "/s/empty/").status == 404  # no index, no listing


def test_alias_maps_the_route_prefix(portico: PorticoProcess) -> None:
    assert get(portico, "/alias/index.html").body == b"<h1>docs</h1>\n"
    assert get(portico, "/alias/").body == b"<h1>docs</h1>\n"
    assert get(portico, "/alias/site.css").status == 404


def test_listing(portico: PorticoProcess) -> None:
    r = get(portico, "/list/listed/")
    assert r.status == 200
    assert r.header("Content-Type") == "text/html; charset=utf-8"
    assert b'href="a%20%3Cb%3E.txt"' in r.body and b"a &lt;b&gt;.txt" in r.body  # escaped
    assert b'href="sub/"' in r.body
    assert b".hidden" not in r.body


def test_spa_fallback_file(portico: PorticoProcess) -> None:
    r = get(portico, "/spa/some/client/route")
    assert r.status == 200 and r.body == b"<app/>\n"


def test_fallback_upstream_takes_what_no_file_matches(portico: PorticoProcess) -> None:
    assert get(portico, "/try/digits.txt").body == DIGITS
    r = get(portico, "/try/no/such/file")
    assert r.status == 200 and b"hello from the app" in r.body
    # methods a file cannot answer go to the app too
    assert b"hello from the app" in get(portico, "/try/digits.txt", "POST").body


def test_methods(portico: PorticoProcess) -> None:
    r = get(portico, "/s/digits.txt", "POST")
    assert r.status == 405
    assert r.header("Allow") == "GET, HEAD"
    head = get(portico, "/s/digits.txt", "HEAD")
    assert head.status == 200
    assert head.header("Content-Length") == "1000"
    assert head.body == b""
    assert head.header("ETag") == get(portico, "/s/digits.txt").header("ETag")


def test_cache_control_rules(portico: PorticoProcess) -> None:
    r = get(portico, "/s/assets/app.3f2a.js")
    assert r.header("Cache-Control") == "public, max-age=31536000, immutable"
    assert get(portico, "/s/digits.txt").header("Cache-Control") is None


def test_keep_alive_across_files(portico: PorticoProcess) -> None:
    with RawConnection(portico.port) as conn:
        for _ in range(3):
            assert conn.request("GET", "/s/digits.txt").body == DIGITS
            assert conn.request("GET", "/s/css/site.css").body == CSS
        # pipelined: answered in order
        conn.send(build_request("GET", "/s/digits.txt") + build_request("GET", "/s/index.html"))
        assert conn.recv_response().body == DIGITS
        assert conn.recv_response().body == b"<h1>home</h1>\n"


# --- path safety ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/s/../../etc/passwd", 400),  # climbs above the root: refused before routing
        ("/s/%2e%2e/%2e%2e/etc/passwd", 400),
        ("/s/css/%2E%2E/%2E%2E/%2E%2E/etc/passwd", 400),
        ("/s/.%2e/.%2e/etc/passwd", 400),
        ("/s/css%2f..%2f..%2fetc%2fpasswd", 400),  # encoded slashes
        ("/s/css%2Fsite.css", 400),
        ("/s/..%5c..%5cetc%5cpasswd", 400),  # encoded backslashes
        ("/s/a%5Cb", 400),
        ("/s/a\\b", 400),  # a raw backslash, though such a file exists
        ("/s/digits.txt%00.html", 400),  # NUL
        ("/s/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd", 400),  # overlong UTF-8 dots
        ("/s/%c0%afetc%c0%afpasswd", 400),  # overlong UTF-8 slash
        ("/s/%e0%80%ae%e0%80%ae/x", 400),
        ("/s/.env", 404),  # hidden names
        ("/s/.git/config", 404),
        ("/s/%2egit/config", 404),
        ("/s/out-link.txt", 404),  # a symlink out of the root
        ("/s/out-dir/secret.txt", 404),
        ("/s/nope.txt", 404),
    ],
)
def test_traversal_shapes_are_refused(portico: PorticoProcess, target: str, status: int) -> None:
    with RawConnection(portico.port) as conn:
        conn.send(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1"))
        r = conn.recv_response()
    assert r.status == status, (target, r.status, r.body[:200])
    assert b"root:" not in r.body and b"secret" not in r.body.lower()


def test_dot_segments_leave_the_route_not_the_root(portico: PorticoProcess) -> None:
    # Normalized before routing: /s/../www-sibling/x.txt is /www-sibling/x.txt, the app's.
    r = get(portico, "/s/../www-sibling/x.txt")
    assert b"sibling" not in r.body and b"hello from the app" in decode(r)


def test_symlinks(portico: PorticoProcess) -> None:
    assert get(portico, "/s/inside-link.txt").body == DIGITS  # inside the root: fine
    assert get(portico, "/links/out-link.txt").body == b"outside secret\n"  # allowed there


# --- conditional requests -------------------------------------------------------------------------


def test_conditionals(portico: PorticoProcess) -> None:
    first = get(portico, "/s/digits.txt")
    etag, lm = first.header("ETag"), first.header("Last-Modified")
    assert etag and lm
    r = get(portico, "/s/digits.txt", If_None_Match=etag)
    assert r.status == 304 and r.body == b""
    assert r.header("ETag") == etag and r.header("Content-Length") is None
    assert get(portico, "/s/digits.txt", If_None_Match='"nope"').status == 200
    assert get(portico, "/s/digits.txt", If_Modified_Since=lm).status == 304
    old = "Mon, 01 Jan 2001 00:00:00 GMT"
    assert get(portico, "/s/digits.txt", If_Modified_Since=old).status == 200
    assert get(portico, "/s/digits.txt", If_Match=etag).status == 200
    r = get(portico, "/s/digits.txt", If_Match='"nope"')
    assert r.status == 412
    assert get(portico, "/s/digits.txt", If_Unmodified_Since=old).status == 412
    assert get(portico, "/s/digits.txt", "HEAD", If_None_Match=etag).status == 304


def test_a_changed_file_gets_a_new_etag(portico: PorticoProcess, tree: Path) -> None:
    path = tree / "changing.txt"
    path.write_bytes(b"one\n")
    try:
        first = get(portico, "/s/changing.txt")
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 2_000_000_000))
        path.write_bytes(b"two!\n")
        second = get(portico, "/s/changing.txt", If_None_Match=first.header("ETag") or "")
        assert second.status == 200 and second.body == b"two!\n"
        assert second.header("ETag") != first.header("ETag")
    finally:
        path.unlink()


# --- ranges ---------------------------------------------------------------------------------------


def test_single_range(portico: PorticoProcess) -> None:
    r = get(portico, "/s/digits.txt", Range="bytes=10-19")
    assert r.status == 206
    assert r.body == DIGITS[10:20]
    assert r.header("Content-Range") == "bytes 10-19/1000"
    assert r.header("Content-Length") == "10"
    assert get(portico, "/s/digits.txt", Range="bytes=-5").body == DIGITS[-5:]
    assert get(portico, "/s/digits.txt", Range="bytes=995-").body == DIGITS[995:]


def test_multiple_ranges(portico: PorticoProcess) -> None:
    r = get(portico, "/s/digits.txt", Range="bytes=0-4,500-504,990-")
    assert r.status == 206
    ctype = r.header("Content-Type") or ""
    assert ctype.startswith("multipart/byteranges; boundary=")
    assert r.header("Content-Length") == str(len(r.body))
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + r.body
    )
    parts = message.get_payload()
    assert isinstance(parts, list) and len(parts) == 3
    got = [(p["Content-Range"], p.get_payload(decode=True)) for p in parts]
    assert got == [
        ("bytes 0-4/1000", DIGITS[0:5]),
        ("bytes 500-504/1000", DIGITS[500:505]),
        ("bytes 990-999/1000", DIGITS[990:]),
    ]
    assert all(p["Content-Type"] == "text/plain; charset=utf-8" for p in parts)


def test_overlapping_ranges_are_coalesced(portico: PorticoProcess) -> None:
    many = ",".join("0-999" for _ in range(100))
    r = get(portico, "/s/digits.txt", Range=f"bytes={many}")
    assert r.status == 206 and r.body == DIGITS  # once, not a hundred times
    spread = ",".join(f"{i * 50}-{i * 50}" for i in range(20)) + ",999-999"
    r = get(portico, "/s/digits.txt", Range=f"bytes={spread}")
    assert len(r.body) <= 2 * len(DIGITS)


def test_unsatisfiable_and_malformed_ranges(portico: PorticoProcess) -> None:
    r = get(portico, "/s/digits.txt", Range="bytes=5000-")
    assert r.status == 416
    assert r.header("Content-Range") == "bytes */1000"
    for bad in ("bytes=9-1", "bytes=abc", "lines=1-2", "bytes"):
        r = get(portico, "/s/digits.txt", Range=bad)
        assert (r.status, r.body) == (200, DIGITS), bad


def test_if_range(portico: PorticoProcess) -> None:
    first = get(portico, "/s/digits.txt")
    etag, lm = first.header("ETag") or "", first.header("Last-Modified") or ""
    assert get(portico, "/s/digits.txt", Range="bytes=0-1", If_Range=etag).status == 206
    assert get(portico, "/s/digits.txt", Range="bytes=0-1", If_Range=lm).status == 206
    stale = get(portico, "/s/digits.txt", Range="bytes=0-1", If_Range='"old"')
    assert (stale.status, stale.body) == (200, DIGITS)
    weak = get(portico, "/s/digits.txt", Range="bytes=0-1", If_Range="W/" + etag)
    assert weak.status == 200


def test_head_with_range_is_a_plain_head(portico: PorticoProcess) -> None:
    r = get(portico, "/s/digits.txt", "HEAD", Range="bytes=0-1")
    assert r.status == 200 and r.header("Content-Length") == "1000"


# --- precompressed siblings -----------------------------------------------------------------------


def test_precompressed_siblings(portico: PorticoProcess, tree: Path) -> None:
    plain = (tree / "app.js").read_bytes()
    br = get(portico, "/s/app.js", Accept_Encoding="gzip, br")
    assert br.header("Content-Encoding") == "br"
    assert brotli.decompress(br.body) == plain
    assert br.header("Vary") == "Accept-Encoding"
    assert br.header("Content-Type") == "text/javascript; charset=utf-8"
    gz = get(portico, "/s/app.js", Accept_Encoding="gzip")
    assert gz.header("Content-Encoding") == "gzip" and gzip.decompress(gz.body) == plain
    ident = get(portico, "/s/app.js")
    assert ident.header("Content-Encoding") is None and ident.body == plain
    assert ident.header("Vary") == "Accept-Encoding"
    # zstd accepted but no .zst on disk: the next best that exists
    assert get(portico, "/s/app.js", Accept_Encoding="zstd, gzip;q=0.5").header(
        "Content-Encoding"
    ) == "gzip"
    tags = {br.header("ETag"), gz.header("ETag"), ident.header("ETag")}
    assert len(tags) == 3  # each representation its own validator
    # 304 per representation
    assert get(portico, "/s/app.js", Accept_Encoding="br", If_None_Match=br.header("ETag") or "")\
        .status == 304
    # a range of the compressed representation
    part = get(portico, "/s/app.js", Accept_Encoding="br", Range="bytes=0-9")
    assert part.status == 206 and part.body == br.body[:10]


# --- compression ----------------------------------------------------------------------------------


def decode(r: RawResponse) -> bytes:
    coding = r.header("Content-Encoding")
    if coding == "gzip":
        return gzip.decompress(r.body)
    if coding == "br":
        return brotli.decompress(r.body)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(r.body)
    assert coding is None
    return r.body


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip, deflate, br, zstd", "zstd"),
        ("br;q=0.5, gzip", "gzip"),
        ("gzip;q=0", None),
        ("identity", None),
        ("", None),
    ],
)
def test_proxied_responses_are_compressed(
    portico: PorticoProcess, accept: str, coding: str | None
) -> None:
    headers = {"Accept_Encoding": accept} if accept else {}
    r = get(portico, "/page", **headers)
    assert r.status == 200
    assert r.header("Content-Encoding") == coding
    assert r.header("Vary") == "Accept-Encoding"
    body = decode(r)
    assert body.startswith(b"<p>hello from the app")
    if coding is not None:
        assert r.header("ETag") == 'W/"v1"'
        assert r.header("Content-Length") is None and r.chunked
        assert len(r.body) < len(body) / 5
    else:
        assert r.header("ETag") == '"v1"'


def test_isal_gzip_engine(portico: PorticoProcess) -> None:
    r = get(portico, "/isal/page", Accept_Encoding="gzip, br")
    assert r.header("Content-Encoding") == "gzip"
    assert gzip.decompress(r.body).startswith(b"<p>hello from the app")


def test_static_files_are_compressed_through_the_stage(portico: PorticoProcess) -> None:
    r = get(portico, "/c/css/site.css", Accept_Encoding="gzip")
    assert r.header("Content-Encoding") == "gzip"
    assert gzip.decompress(r.body) == CSS
    assert r.header("Accept-Ranges") is None
    assert (r.header("ETag") or "").startswith('W/"')
    # excluded: HEAD, ranges, small files
    assert get(portico, "/c/css/site.css", "HEAD", Accept_Encoding="gzip").header(
        "Content-Encoding"
    ) is None
    part = get(portico, "/c/css/site.css", Accept_Encoding="gzip", Range="bytes=0-9")
    assert part.status == 206 and part.body == CSS[:10]
    assert get(portico, "/c/index.html", Accept_Encoding="gzip").header("Content-Encoding") is None


def test_http10_client_gets_a_close_delimited_compressed_body(portico: PorticoProcess) -> None:
    with RawConnection(portico.port) as conn:
        conn.send(b"GET /c/css/site.css HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
        raw = conn.recv_until_close(10)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Content-Encoding: gzip" in head
    assert zlib.decompress(body, 31) == CSS


# --- REDbot ------------------------------------------------------------------------------------


def redbot(url: str, *headers: str) -> list[dict[str, str]]:
    """REDbot's notes on one URL (it also sends its own conditional and range subrequests)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.redbot_check", url, *headers],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def complaints(notes: list[dict[str, str]]) -> list[dict[str, str]]:
    return [n for n in notes if n["level"] in ("warning", "bad")]


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/r/css/site.css", ()),  # a static file: validators, conditionals, its range probe
        ("/r/digits.txt", ("Range: bytes=100-199",)),  # a range request
        ("/r/app.js", ("Accept-Encoding: gzip",)),  # no sibling on this route: identity
        ("/page", ()),  # a compressed proxied response (REDbot negotiates gzip itself)
        ("/rc/css/site.css", ()),  # a static file compressed by the stage
    ],
)
def test_redbot_finds_nothing_to_complain_about(
    portico: PorticoProcess, target: str, headers: tuple[str, ...]
) -> None:
    notes = redbot(portico.url + target, *headers)
    names = {n["name"] for n in notes}
    assert complaints(notes) == [], notes
    if target in ("/page", "/rc/css/site.css"):
        assert {"CONNEG_GZIP_GOOD", "INM_304"} <= names, notes  # gzip, Vary, ETags all right
    elif not headers:
        assert {"INM_304", "IMS_304", "RANGE_CORRECT"} <= names, notes


# --- the acceptance example ------------------------------------------------------

ACCEPTANCE = """\
[server]
listen = ["127.0.0.1:{port}"]

[upstreams.app]
backends = ["{backend}"]

[[routes]]   # GET /static/css/site.css serves /srv/www/css/site.css, with ETag, ranges, 304s
path = "/static/"
strip_prefix = "/static"
static = {{ root = "{root}" }}

[[routes]]   # proxied; responses compressed when the client accepts it
path = "/"
upstream = "app"
compress = true
"""


def test_acceptance_example(tree: Path, backend: RawBackend, tmp_path: Path) -> None:
    from tests.support.ports import free_port

    text = ACCEPTANCE.format(port=free_port(), backend=backend.url, root=tree)
    path = tmp_path / "portico.toml"
    path.write_text(text)
    check = subprocess.run(
        [sys.executable, "-m", "portico", "check", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with PorticoProcess(text) as proxy:
        r = get(proxy, "/static/css/site.css")
        assert r.status == 200 and r.body == CSS
        etag = r.header("ETag") or ""
        assert etag and r.header("Accept-Ranges") == "bytes"
        assert get(proxy, "/static/css/site.css", If_None_Match=etag).status == 304
        part = get(proxy, "/static/css/site.css", Range="bytes=0-3")
        assert (part.status, part.body) == (206, CSS[:4])
        page = get(proxy, "/", Accept_Encoding="gzip, br")
        assert page.header("Content-Encoding") in ("br", "zstd", "gzip")
        assert decode(page).startswith(b"<p>hello from the app")
        assert get(proxy, "/").header("Content-Encoding") is None


# --- curl -----------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_resumes_a_download_and_decodes_compression(
    portico: PorticoProcess, tmp_path: Path
) -> None:
    out = tmp_path / "digits.txt"
    out.write_bytes(DIGITS[:400])  # an interrupted download
    subprocess.run(
        ["curl", "-sS", "--fail", "-C", "-", "-o", str(out), f"{portico.url}/s/digits.txt"],
        check=True, timeout=30,
    )
    assert out.read_bytes() == DIGITS
    done = subprocess.run(
        ["curl", "-sS", "--fail", "--compressed", "-D", "-", f"{portico.url}/c/css/site.css"],
        check=True, timeout=30, capture_output=True,
    )
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    assert b"content-encoding: " in head.lower()
    assert body == CSS
