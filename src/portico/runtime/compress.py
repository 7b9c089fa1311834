"""The ``compress`` stage: zstd, brotli or gzip applied to a response body as it streams.

Each chunk the handler passes in is compressed and flushed at once (a sync flush), so a
Server-Sent Event or a streamed line reaches the client when the backend sent it, at the
cost of a few bytes per chunk; nothing waits for "enough" data. Every encoder's window is
capped, so one response holds a bounded amount of memory whatever its length.

The decision (``Compress.body_filter``) is pure: the response status, head and the request's
``Accept-Encoding`` in, header edits and an encoder (or None) out. Never compressed: codings
already applied, 206, 204, 304, 1xx, HEAD, ``Cache-Control: no-transform``, a type outside
the allow-list, a known length under the minimum.
"""

from __future__ import annotations

import importlib.util
import zlib
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from portico.policy.encoding import CODINGS, negotiate
from portico.runtime.request import Headers, RequestState
from portico.runtime.stages import BodyFilter, Stage

#: Media types compressed by default: text and the structured text formats. Images, video,
#: archives and fonts other than TrueType are already compressed.
DEFAULT_TYPES = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/x-javascript",
    "application/xml",
    "application/*+xml",
    "application/wasm",
    "application/x-ndjson",
    "image/svg+xml",
    "image/x-icon",
    "font/ttf",
    "font/otf",
)

#: Default level per coding: gzip 6 is zlib's own default; brotli 4 and zstd 3 are the
#: points past which the CPU cost grows faster than the ratio for on-the-fly compression.
DEFAULT_LEVELS = {"gzip": 6, "br": 4, "zstd": 3}

# Window sizes (log2 bytes): 32 KiB for gzip (fixed by the format), 256 KiB for brotli and
# 512 KiB for zstd: enough for web text, and it bounds memory per response.
_BROTLI_LGWIN = 18
_ZSTD_WINDOW_LOG = 19

_MODULES = {"br": "brotli", "zstd": "zstandard", "gzip": "zlib"}


def available(coding: str) -> bool:
    """Whether the binding for a coding is installed (``portico[compress]`` brings them)."""
    return importlib.util.find_spec(_MODULES[coding]) is not None


class GzipEncoder(BodyFilter):
    __slots__ = ("z",)

    def __init__(self, level: int, engine: str = "zlib") -> None:
        if engine == "isal":
            # ISA-L: the same gzip format, 7-17x faster than zlib here (docs/benchmarks.md).
            from isal import isal_zlib

            self.z: Any = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)
        else:
            self.z = zlib.compressobj(level, zlib.DEFLATED, 31, 8)  # 31: gzip wrapper, 32 KiB

    def feed(self, data: bytes) -> bytes:
        z = self.z
        out: bytes = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
        return out

    def end(self) -> bytes:
        out: bytes = self.z.flush(zlib.Z_FINISH)
        return out


class BrotliEncoder(BodyFilter):
    __slots__ = ("c",)

    def __init__(self, level: int) -> None:
        import brotli

        self.c: Any = brotli.Compressor(quality=level, lgwin=_BROTLI_LGWIN)

    def feed(self, data: bytes) -> bytes:
        c = self.c
        out: bytes = c.process(data) + c.flush()
        return out

    def end(self) -> bytes:
        out: bytes = self.c.finish()
        return out


class ZstdEncoder(BodyFilter):
    __slots__ = ("c", "flush_block", "flush_finish")

    def __init__(self, level: int) -> None:
        import zstandard

        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=_ZSTD_WINDOW_LOG
        )
        self.c: Any = zstandard.ZstdCompressor(compression_params=params).compressobj()
        self.flush_block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self.flush_finish = zstandard.COMPRESSOBJ_FLUSH_FINISH

    def feed(self, data: bytes) -> bytes:
        c = self.c
        out: bytes = c.compress(data) + c.flush(self.flush_block)
        return out

    def end(self) -> bytes:
        out: bytes = self.c.flush(self.flush_finish)
        return out


def encoder(coding: str, level: int, gzip_engine: str = "zlib") -> BodyFilter:
    if coding == "gzip":
        return GzipEncoder(level, gzip_engine)
    if coding == "br":
        return BrotliEncoder(level)
    return ZstdEncoder(level)


def weaken(tag: bytes) -> bytes:
    """A strong ETag made weak: the compressed bytes are not the identity's bytes, and a
    range request against them would be meaningless (RFC 9110 8.8.3)."""
    return tag if tag.startswith(b"W/") else b"W/" + tag


def _has_token(value: bytes, token: bytes) -> bool:
    return any(t.strip().lower() == token for t in value.split(b","))


def add_vary(headers: Headers, token: bytes = b"Accept-Encoding") -> None:
    low = token.lower()
    for i, (name, value) in enumerate(headers):
        if name.lower() == b"vary":
            if _has_token(value, low) or value.strip() == b"*":
                return
            headers[i] = (name, value + b", " + token)
            return
    headers.append((b"Vary", token))


class Compress(Stage):
    """Negotiates a coding and wraps the body in its encoder."""

    __slots__ = ("codings", "gzip_engine", "levels", "min_size", "types")
    body_hook = True
    on_response_hook = True

    def __init__(
        self,
        codings: Sequence[str],
        levels: Mapping[str, int],
        min_size: int,
        types: Sequence[str],
        gzip_engine: str = "zlib",
    ) -> None:
        self.codings = tuple(c for c in codings if c in CODINGS)
        self.gzip_engine = gzip_engine
        self.levels = {**DEFAULT_LEVELS, **levels}
        self.min_size = min_size
        self.types = tuple(t.lower() for t in types)

    def _type_allowed(self, ctype: bytes) -> bool:
        media = ctype.split(b";", 1)[0].strip().lower().decode("latin-1")
        return any(fnmatchcase(media, t) for t in self.types)

    def on_response(self, req: RequestState, status: int, headers: Headers) -> None:
        """Heads that are never compressed but must say what a 200 would (RFC 9110 15.3.7,
        RFC 9111 4.3.4): a 206 and a HEAD answer carry the same Vary, and a 304, which
        updates what a cache stored, the same Vary and, for a client that would get a
        compressed body, the same weakened ETag. A 304 often has no Content-Type, so it is
        not judged by type: a Vary too many costs a cache a split key, a missing one a
        wrong body."""
        if status == 304:
            add_vary(headers)
            if self._coding(req) is not None:
                for i, (name, value) in enumerate(headers):
                    if name.lower() == b"etag":
                        headers[i] = (name, weaken(value))
        elif (
            status == 206 or (req.head.method == b"HEAD" and 200 <= status < 300)
        ) and self._eligible(headers) is not None:
            add_vary(headers)

    def _coding(self, req: RequestState) -> str | None:
        return negotiate(
            (v for n, v in req.head.headers if n.lower() == b"accept-encoding"), self.codings
        )

    def _eligible(self, headers: Headers) -> int | None:
        """The known length (-1 if unknown) if a body with this head could be compressed."""
        ctype: bytes | None = None
        length = -1
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-encoding":
                if value.strip().lower() != b"identity":
                    return None
            elif lname == b"cache-control":
                if _has_token(value, b"no-transform"):
                    return None
            elif lname == b"content-type":
                ctype = value
            elif lname == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return None
        if ctype is None or not self._type_allowed(ctype):
            return None
        return length

    def body_filter(self, req: RequestState, status: int, headers: Headers) -> BodyFilter | None:
        if status < 200 or status in (204, 206, 304) or req.head.method == b"HEAD":
            return None
        length = self._eligible(headers)
        if length is None:
            return None
        if 0 <= length < self.min_size:
            return None
        # From here the answer depends on Accept-Encoding, whichever coding is chosen.
        add_vary(headers)
        coding = self._coding(req)
        if coding is None:
            return None
        out: Headers = []
        for name, value in headers:
            lname = name.lower()
            if lname in (b"content-length", b"accept-ranges", b"content-encoding"):
                continue
            if lname == b"etag":
                value = weaken(value)
            out.append((name, value))
        out.append((b"Content-Encoding", coding.encode("ascii")))
        headers[:] = out
        return encoder(coding, self.levels[coding], self.gzip_engine)
