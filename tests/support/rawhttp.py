"""A tiny blocking raw-socket HTTP/1.1 client for protocol tests that need byte-level control.

``send_raw`` is for one-shot exchanges ("send these bytes, give me everything until close").
``RawConnection`` keeps one connection and parses responses one at a time off its stream, which
is what pipelining and keep-alive tests need: send two requests in one write, then call
``recv_response`` twice. Parsing is deliberately strict about CRLF and framing, because this is
what checks that portico writes correct HTTP.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

Headers = Sequence[tuple[str, str]] | Mapping[str, str]

# One recv() at a time; a protocol test never needs more per call.
RECV_SIZE = 65536


class IncompleteResponse(Exception):
    """The server closed (``reset`` False) or reset (``reset`` True) the connection in the
    middle of a response, or before it; ``partial`` holds what had arrived."""

    def __init__(self, reason: str, partial: bytes, reset: bool = False) -> None:
        super().__init__(f"{reason}; received {partial[:500]!r}")
        self.partial = partial
        self.reset = reset


class MalformedResponse(Exception):
    """The bytes received are not a valid HTTP/1.1 response."""


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes = b""  # exactly the bytes this response took off the stream
    chunked: bool = False

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        lower = name.lower()
        return [v for k, v in self.headers if k.lower() == lower]

    def json(self) -> Any:
        return json.loads(self.body)


def build_request(
    method: str = "GET",
    target: str = "/",
    headers: Headers = (),
    body: bytes = b"",
    host: str | None = "127.0.0.1",
    version: str = "HTTP/1.1",
) -> bytes:
    """Request bytes. Adds ``Host`` (unless ``host`` is None or one is given) and
    ``Content-Length`` for a non-empty body unless a framing header is given. Nothing else."""
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    names = {k.lower() for k, _ in pairs}
    if host is not None and "host" not in names:
        pairs.insert(0, ("Host", host))
    if body and not names & {"content-length", "transfer-encoding"}:
        pairs.append(("Content-Length", str(len(body))))
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in pairs)
    return head.encode("latin-1") + b"\r\n" + body


def chunked(pieces: Iterable[bytes], trailers: Headers = ()) -> bytes:
    """``pieces`` in chunked transfer coding (empty pieces are skipped), with trailers."""
    out = bytearray()
    for piece in pieces:
        if piece:
            out += b"%x\r\n%s\r\n" % (len(piece), piece)
    out += b"0\r\n"
    pairs = trailers.items() if isinstance(trailers, Mapping) else trailers
    for k, v in pairs:
        out += f"{k}: {v}\r\n".encode("latin-1")
    return bytes(out + b"\r\n")


def send_raw(
    port: int,
    data: bytes,
    read_timeout: float = 5.0,
    host: str = "127.0.0.1",
    half_close: bool = False,
) -> bytes:
    """Send ``data``, then return everything received until the server closes or
    ``read_timeout`` seconds pass (whatever arrived by then). A reset ends reading too.
    ``half_close`` shuts our write side after sending."""
    with RawConnection(port, host=host, timeout=read_timeout) as conn:
        conn.send(data)
        if half_close:
            conn.shutdown_write()
        return conn.recv_until_close(read_timeout)


class RawConnection:
    """One client connection; parses responses off the stream one by one."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 5.0,
        source: str | None = None,
    ) -> None:
        """``source``: the local address to connect from (any of 127.0.0.0/8 works on Linux),
        for tests where the client's address matters."""
        self.timeout = timeout
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self._buf = bytearray()
        self._eof = False

    def __repr__(self) -> str:
        where = self.sock.getsockname() if self.sock.fileno() >= 0 else "closed"
        return f"<RawConnection {where} buffered={len(self._buf)} eof={self._eof}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # --- sending ----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: Headers = (),
        body: bytes = b"",
        host: str | None = "127.0.0.1",
    ) -> RawResponse:
        """Send one request built by ``build_request`` and read its response."""
        self.send(build_request(method, target, headers, body, host))
        return self.recv_response(head=method == "HEAD")

    def shutdown_write(self) -> None:
        """Half-close: the server sees EOF, we can still read."""
        self.sock.shutdown(socket.SHUT_WR)

    # --- receiving --------------------------------------------------------------------------

    @property
    def pending(self) -> bytes:
        """Bytes received but not yet consumed by a parsed response."""
        return bytes(self._buf)

    def recv_response(self, timeout: float | None = None, *, head: bool = False) -> RawResponse:
        """Read exactly one response. ``head=True`` if it answers a HEAD request (no body).

        Interim 1xx responses are returned like any other; call again for the final one.
        Raises TimeoutError, IncompleteResponse (closed or reset early) or MalformedResponse.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        reader = _Cursor(self, deadline)
        head_bytes = reader.until(b"\r\n\r\n", "response head")
        version, status, reason, headers = _parse_head(head_bytes)
        response = RawResponse(version, status, reason, headers)
        if not (head or 100 <= status < 200 or status in (204, 304)):
            _read_body(reader, response)
        response.raw = reader.consume()
        return response

    def recv_until_close(self, timeout: float | None = None) -> bytes:
        """Everything until EOF, a reset or the timeout (no error on timeout)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while self._fill(deadline):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def closed(self, timeout: float = 1.0) -> bool:
        """True if the server closes (EOF or reset) within ``timeout``. Data that arrives in the
        meantime is kept in ``pending``."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def _fill(self, deadline: float) -> bool:
        """Receive once into the buffer. False at EOF; TimeoutError past ``deadline``."""
        if self._eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        self.sock.settimeout(remaining)
        data = self.sock.recv(RECV_SIZE)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True


class _Cursor:
    """Reads parts of one response from a RawConnection's buffer, tracking what it consumed."""

    def __init__(self, conn: RawConnection, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline
        self.pos = 0

    def _more(self, what: str) -> None:
        try:
            got = self.conn._fill(self.deadline)
        except TimeoutError:
            raise TimeoutError(
                f"no complete {what} in time; received {bytes(self.conn._buf)[:500]!r}"
            ) from None
        except ConnectionResetError:
            raise IncompleteResponse(
                f"connection reset inside the {what}", bytes(self.conn._buf), reset=True
            ) from None
        if not got:
            raise IncompleteResponse(f"connection closed inside the {what}", bytes(self.conn._buf))

    def until(self, delimiter: bytes, what: str) -> bytes:
        while (end := self.conn._buf.find(delimiter, self.pos)) < 0:
            self._more(what)
        data = bytes(self.conn._buf[self.pos : end])
        self.pos = end + len(delimiter)
        return data

    def exactly(self, n: int, what: str) -> bytes:
        while len(self.conn._buf) - self.pos < n:
            self._more(what)
        data = bytes(self.conn._buf[self.pos : self.pos + n])
        self.pos += n
        return data

    def to_eof(self) -> bytes:
        try:
            while self.conn._fill(self.deadline):
                pass
        except TimeoutError:
            raise TimeoutError("close-delimited body: server did not close in time") from None
        except ConnectionResetError:
            raise IncompleteResponse(
                "connection reset inside a close-delimited body", bytes(self.conn._buf), True
            ) from None
        data = bytes(self.conn._buf[self.pos :])
        self.pos = len(self.conn._buf)
        return data

    def consume(self) -> bytes:
        data = bytes(self.conn._buf[: self.pos])
        del self.conn._buf[: self.pos]
        self.pos = 0
        return data


def _parse_head(head: bytes) -> tuple[str, int, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise MalformedResponse(f"bad status line {lines[0]!r}")
    version, status, reason = parts[0], int(parts[1]), parts[2] if len(parts) == 3 else ""
    return version, status, reason, _parse_fields(lines[1:])


def _parse_fields(lines: list[str]) -> list[tuple[str, str]]:
    fields = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise MalformedResponse(f"bad header line {line!r}")
        fields.append((name, value.strip(" \t")))
    return fields


def _read_body(reader: _Cursor, response: RawResponse) -> None:
    codings = [
        c.strip().lower() for v in response.header_values("transfer-encoding") for c in v.split(",")
    ]
    lengths = {v.strip() for v in response.header_values("content-length")}
    if codings:
        if codings[-1] == "chunked":
            response.chunked = True
            response.body, response.trailers = _read_chunked(reader)
        else:
            response.body = reader.to_eof()
    elif lengths:
        if len(lengths) > 1 or not next(iter(lengths)).isdigit():
            raise MalformedResponse(f"bad Content-Length {sorted(lengths)}")
        response.body = reader.exactly(int(lengths.pop()), "body")
    else:
        response.body = reader.to_eof()


def _read_chunked(reader: _Cursor) -> tuple[bytes, list[tuple[str, str]]]:
    body = bytearray()
    while True:
        size_line = reader.until(b"\r\n", "chunk size line")
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise MalformedResponse(f"bad chunk size line {size_line!r}") from None
        if size == 0:
            break
        body += reader.exactly(size, "chunk")
        if reader.exactly(2, "chunk end") != b"\r\n":
            raise MalformedResponse("chunk data not followed by CRLF")
    trailer_lines = []
    while line := reader.until(b"\r\n", "trailer section"):
        trailer_lines.append(line.decode("latin-1"))
    return bytes(body), _parse_fields(trailer_lines)
