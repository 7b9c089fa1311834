"""The HTTP decisions of serving a file, as pure functions (the I/O is in dataplane/static.py).

* ``url_segments``: a request path to path segments under the root, or the reason it is
  refused. Traversal is refused lexically here (``..``, encoded slashes and backslashes, NUL,
  invalid or overlong UTF-8); symlinks leaving the root are refused by the handler after it
  has opened the file, from the path the kernel reports for the open descriptor.
* ``etag``, ``http_date``, ``parse_http_date``: validators from a file's identity.
* ``preconditions``: RFC 9110 13.2.2 (If-Match, If-Unmodified-Since, If-None-Match,
  If-Modified-Since) in the order the RFC gives.
* ``parse_ranges``, ``if_range_holds``: RFC 9110 14 (byte ranges, coalesced and bounded).
* ``content_type``, ``cache_control``, ``precompressed_choice``.
"""

from __future__ import annotations

import calendar
import mimetypes
import re
from collections.abc import Sequence
from email.utils import formatdate, parsedate_tz
from fnmatch import fnmatchcase
from functools import lru_cache

from portico.policy.encoding import choose

# --- paths ------------------------------------------------------------------------------------

BAD_REQUEST, NOT_FOUND = 400, 404

_HEX = frozenset(b"0123456789abcdefABCDEF")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _percent_decode(path: bytes) -> bytes | None:
    """Decode %XX everywhere; None if an escape is malformed."""
    if b"%" not in path:
        return path
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == 0x25:  # '%'
            if i + 2 >= n:
                return None
            a, b = path[i + 1], path[i + 2]
            if a not in _HEX or b not in _HEX:
                return None
            out.append(int(path[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def url_segments(path: bytes, allow_hidden: bool) -> list[str] | int:
    """The decoded segments of an absolute request path, or the status to refuse it with.

    400 for what no honest client sends: a malformed escape, an encoded ``/`` (it would
    change the path's structure after routing), a backslash (a separator elsewhere), a NUL
    or control character, bytes that are not UTF-8 (overlong forms included: Python's
    decoder refuses them), ``.`` or ``..`` segments left after decoding.
    404 for hidden names (a segment starting with ``.``) unless allowed: a ``.git`` or
    ``.env`` left in a web root must not be served by accident.
    A trailing slash gives a last segment ``""`` (a directory was asked for)."""
    if not path.startswith(b"/"):
        return BAD_REQUEST
    raw_segments = path[1:].split(b"/")
    out: list[str] = []
    for raw in raw_segments:
        seg = _percent_decode(raw)
        if seg is None:
            return BAD_REQUEST
        if b"/" in seg or b"\\" in seg:
            return BAD_REQUEST
        if _CONTROL.search(seg):
            return BAD_REQUEST
        try:
            text = seg.decode("utf-8")
        except UnicodeDecodeError:
            return BAD_REQUEST
        if text in (".", ".."):
            return BAD_REQUEST
        out.append(text)
    for i, text in enumerate(out):
        if text == "" and i != len(out) - 1:
            return BAD_REQUEST  # an empty segment inside: normalization should have merged it
        if text.startswith(".") and not allow_hidden:
            return NOT_FOUND
    return out


def within(path: str, root: str) -> bool:
    """True if ``path`` (a resolved, absolute path) is ``root`` or below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


# --- validators -------------------------------------------------------------------------------


def etag(mtime_ns: int, size: int, ino: int, coding: str = "") -> bytes:
    """A strong ETag from the file's identity: any write changes mtime or size, a replaced
    file changes the inode. A precompressed sibling has its own tag, suffixed by coding."""
    tag = b'"%x-%x-%x' % (ino, mtime_ns // 1000, size)
    if coding:
        tag += b"-" + coding.encode("ascii")
    return tag + b'"'


@lru_cache(maxsize=1024)
def _http_date(seconds: int) -> bytes:
    return formatdate(seconds, usegmt=True).encode("ascii")


def http_date(seconds: float) -> bytes:
    return _http_date(int(seconds))


def parse_http_date(value: bytes) -> int | None:
    """Seconds since the epoch for an HTTP-date (IMF-fixdate, RFC 850 or asctime), or None."""
    try:
        parts = parsedate_tz(value.decode("latin-1"))
    except (ValueError, IndexError):
        return None
    if parts is None:
        return None
    try:
        stamp = calendar.timegm(parts[:6])
    except (TypeError, ValueError, OverflowError):
        return None
    return stamp - (parts[9] or 0)


_TAG = re.compile(rb'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


def _tags(value: bytes) -> list[tuple[bool, bytes]] | None:
    """(weak, opaque-tag) pairs of an entity-tag list; None if it is malformed."""
    out: list[tuple[bool, bytes]] = []
    pos, n = 0, len(value)
    while pos < n:
        if not value[pos:].strip(b" \t,"):
            break
        m = _TAG.match(value, pos)
        if m is None:
            return None
        out.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
    return out


def _strong_match(header: bytes, tag: bytes) -> bool:
    if header.strip() == b"*":
        return True
    tags = _tags(header)
    return tags is not None and any(not weak and t == tag for weak, t in tags)


def _weak_match(header: bytes, tag: bytes) -> bool:
    if header.strip() == b"*":
        return True
    bare = tag[2:] if tag.startswith(b"W/") else tag
    tags = _tags(header)
    return tags is not None and any(t == bare for _, t in tags)


PROCEED, NOT_MODIFIED, PRECONDITION_FAILED = 0, 304, 412


def preconditions(
    method: bytes,
    headers: dict[bytes, bytes],
    tag: bytes,
    mtime: int,
) -> int:
    """RFC 9110 13.2.2 for a resource that exists: PROCEED, NOT_MODIFIED or
    PRECONDITION_FAILED. ``headers`` holds lower-case names (combined values);
    ``mtime`` is whole seconds, as Last-Modified carries."""
    if_match = headers.get(b"if-match")
    if if_match is not None:
        if not _strong_match(if_match, tag):
            return PRECONDITION_FAILED
    else:
        ius = headers.get(b"if-unmodified-since")
        if ius is not None:
            date = parse_http_date(ius)
            if date is not None and mtime > date:
                return PRECONDITION_FAILED
    inm = headers.get(b"if-none-match")
    get_or_head = method in (b"GET", b"HEAD")
    if inm is not None:
        if _weak_match(inm, tag):
            return NOT_MODIFIED if get_or_head else PRECONDITION_FAILED
    elif get_or_head:
        ims = headers.get(b"if-modified-since")
        if ims is not None:
            date = parse_http_date(ims)
            if date is not None and mtime <= date:
                return NOT_MODIFIED
    return PROCEED


# --- ranges -------------------------------------------------------------------------------------

#: Parts of a multipart/byteranges answer at most, after coalescing; beyond this the Range
#: header is ignored and the whole file sent (RFC 9110 14.2 allows a server to ignore it).
MAX_RANGES = 16
#: Range specs read at most from one header; a longer list is ignored without parsing more.
MAX_RANGE_SPECS = 200
#: Ranges closer than this are merged: a part header costs about as much.
COALESCE_GAP = 80

UNSATISFIABLE = "unsatisfiable"

Range = tuple[int, int]  # first byte, last byte (inclusive), as Content-Range writes them


def parse_ranges(value: bytes, size: int) -> list[Range] | str | None:
    """The byte ranges to send for a ``Range`` value and a representation of ``size`` bytes.

    None: ignore the header and send everything (malformed, not bytes, or too many ranges);
    UNSATISFIABLE: answer 416; otherwise sorted, coalesced ranges (overlapping and near ones
    merged, so a list can never ask for more bytes than the file has, whatever its length)."""
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes":
        return None
    specs = spec.split(b",")
    if len(specs) > MAX_RANGE_SPECS:
        return None
    ranges: list[Range] = []
    seen = False
    for item in specs:
        item = item.strip()
        if not item:
            continue  # empty list elements are allowed by the list syntax
        seen = True
        first, dash, last = item.partition(b"-")
        if not dash:
            return None
        first, last = first.strip(), last.strip()
        if first:
            if not first.isdigit() or (last and not last.isdigit()):
                return None
            start = int(first)
            end = int(last) if last else size - 1
            if last and end < start:
                return None  # invalid range-spec: the whole field is ignored
            if start >= size:
                continue  # unsatisfiable on its own
            ranges.append((start, min(end, size - 1)))
        else:
            if not last.isdigit():
                return None
            n = int(last)
            if n == 0 or size == 0:
                continue
            ranges.append((max(0, size - n), size - 1))
    if not seen:
        return None
    if not ranges:
        return UNSATISFIABLE
    ranges.sort()
    merged = [ranges[0]]
    for start, end in ranges[1:]:
        prev_start, prev_end = merged[-1]
        if start <= prev_end + 1 + COALESCE_GAP:
            merged[-1] = (prev_start, max(prev_end, end))
        else:
            merged.append((start, end))
    if len(merged) > MAX_RANGES:
        return None
    return merged


def if_range_holds(value: bytes, tag: bytes, last_modified: bytes) -> bool:
    """RFC 9110 13.1.5: the range applies only if the validator still matches, strongly.
    A date matches only as an exact Last-Modified value (a weaker test would let a file
    changed twice in one second be resumed from the wrong version)."""
    v = value.strip()
    if v.startswith(b'"') or v.startswith(b"W/"):
        return v == tag and not tag.startswith(b"W/")
    return v == last_modified


# --- types, caching, siblings ---------------------------------------------------------------------

# A MimeTypes with only Python's built-in table: the same answers on every machine,
# whatever /etc/mime.types holds.
_MIME = mimetypes.MimeTypes(filenames=())
_EXTRA = {
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".wasm": "application/wasm",
    ".webmanifest": "application/manifest+json",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".avif": "image/avif",
    ".webp": "image/webp",
    ".map": "application/json",
    ".md": "text/markdown",
}
_CHARSET_TYPES = ("text/", "application/javascript", "application/xml", "image/svg+xml")


def content_type(name: str, overrides: dict[str, str], charset: str) -> bytes:
    """The Content-Type for a file name: configured extensions first, then a fixed table;
    text types carry ``charset``. Unknown types are ``application/octet-stream``."""
    dot = name.rfind(".")
    ext = name[dot:].lower() if dot > 0 else ""
    ctype = overrides.get(ext) or _EXTRA.get(ext) or _MIME.types_map[1].get(ext)
    if ctype is None:
        ctype = _MIME.types_map[0].get(ext, "application/octet-stream")
    if charset and ctype.startswith(_CHARSET_TYPES) and "charset" not in ctype:
        ctype += f"; charset={charset}"
    return ctype.encode("latin-1")


def cache_control(rules: Sequence[tuple[str, bytes]], rel_path: str) -> bytes | None:
    """The first rule whose glob matches the path below the root (``/assets/app.css``);
    ``*`` crosses ``/``, so ``*.css`` matches CSS files at any depth."""
    for pattern, value in rules:
        if fnmatchcase(rel_path, pattern):
            return value
    return None


def precompressed_choice(
    accepted: dict[str, float] | None, available: Sequence[str]
) -> str | None:
    """Which sibling (coding) to send, given the ones present on disk in the server's order."""
    return choose(accepted, available) if available else None


#: File name suffix of a precompressed sibling per coding.
SIBLING_SUFFIX = {"br": ".br", "zstd": ".zst", "gzip": ".gz"}
