"""Bodies stream through Portico in both directions without being held in its memory.

A 1 GiB download (Content-Length and chunked) and a 1 GiB upload (both framings) pass through
intact, checked by length and SHA-256 on both ends, while Portico's RSS, sampled during the
transfer, stays within ``RSS_GROWTH_LIMIT`` of what it was before. Neither end ever holds the
body either: the bytes are generated block by block (``behaviours.pattern_block``) and
consumed by an incremental decoder that keeps only a count and a digest.

Backpressure is shown from the outside: a client that stops reading stops the backend's
writes (it waits in ``drain()``), and a backend that stops reading stops the client's sends,
with Portico's memory flat meanwhile; both transfers then complete intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.behaviours import Handler, StreamProgress, pattern_block, stream_pattern
from tests.support.ports import free_port
from tests.support.processes import rss
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import build_request
from tests.support.waiting import wait_until

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Portico's RSS may grow this much over its pre-transfer baseline while a body of any size
# passes through: its own buffers are bounded at 64 KiB per direction, and the rest of this
# margin is allocator slack. Buffering even a small share of a 1 GiB body would exceed it.
RSS_GROWTH_LIMIT = 30 * MiB

# What the kernel's socket buffers between two stalled peers can hold on loopback (receive
# buffers auto-tune up to net.ipv4.tcp_rmem's maximum, 32 MiB by default, send buffers up to
# 4 MiB). A stall must come well before a body of this size has been sent, or something
# other than the kernel (Portico) is holding the body.
IN_FLIGHT_LIMIT = 160 * MiB

# recv_into() buffer of the test's clients and the sink backend: big reads keep the per-byte
# Python work at zero and the per-read work negligible.
RECV_BUFFER = 1 * MiB

# A whole 1 GiB transfer must finish within this; a few seconds is normal.
TRANSFER_DEADLINE = 60.0


def proxy_config(backend_url: str, **server: Any) -> dict[str, Any]:
    return {
        "server": {"timeouts": {"header": 5, "body_idle": 10, "send": 20}, **server},
        "upstreams": {
            "app": {
                "backends": [backend_url],
                "timeouts": {"connect": 2, "response_header": 20, "body_idle": 10},
            }
        },
    }


# --- measuring Portico's memory ---------------------------------------------------------------


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a background thread.

    ``baseline`` is the RSS when the sampler starts, ``peak`` the highest sample since. The
    thread stops on exit, or by itself after ``limit`` seconds.
    """

    def __init__(self, pid: int, interval: float = 0.02, limit: float = 120.0) -> None:
        self.pid = pid
        self.interval = interval
        self.limit = limit
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __repr__(self) -> str:
        return (
            f"<RssSampler baseline={self.baseline / MiB:.1f} MiB peak={self.peak / MiB:.1f} MiB"
            f" growth={self.growth / MiB:.1f} MiB samples={self.samples}>"
        )

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def sample(self) -> int:
        value = rss(self.pid)
        self.peak = max(self.peak, value)
        self.samples += 1
        return value

    def __enter__(self) -> Self:
        self.baseline = self.peak = rss(self.pid)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sample()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.wait(self.interval) and time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # the process may be gone at the very end
                self.sample()


def assert_flat(sampler: RssSampler, what: str) -> None:
    assert sampler.samples >= 5, f"{what}: too few RSS samples to judge ({sampler!r})"
    assert sampler.growth < RSS_GROWTH_LIMIT, (
        f"{what}: Portico's RSS grew by {sampler.growth / MiB:.1f} MiB "
        f"(limit {RSS_GROWTH_LIMIT / MiB:.0f} MiB): {sampler!r}"
    )


# --- an incremental body decoder that keeps only a count and a digest -------------------------

_DATA, _LINE_SIZE, _LINE_CRLF, _LINE_TRAILER = range(4)
_MAX_LINE = 4096


class BodyDecoder:
    """Decodes one HTTP/1.1 body (Content-Length, or chunked when ``length`` is None) fed in
    pieces, keeping only its length and SHA-256. Strict about chunked framing."""

    def __init__(self, length: int | None) -> None:
        self.chunked = length is None
        self.digest = hashlib.sha256()
        self.count = 0
        self.chunks = 0
        self.done = length == 0
        self._state = _LINE_SIZE if length is None else _DATA
        self._left = length or 0
        self._line = bytearray()

    def __repr__(self) -> str:
        kind = "chunked" if self.chunked else "length"
        return f"<BodyDecoder {kind} count={self.count} chunks={self.chunks} done={self.done}>"

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()

    @property
    def remaining(self) -> int:
        """Bytes left in the current chunk, or in the whole body with Content-Length."""
        return self._left

    def feed(self, buf: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
        """Consume ``buf[start:end]``; return where this body ended in it (``end`` if it has
        not ended yet). Raises ValueError on bad chunked framing."""
        pos = start
        end = len(buf) if end is None else end
        view = memoryview(buf)
        while pos < end and not self.done:
            if self._state == _DATA:
                n = min(self._left, end - pos)
                self.digest.update(view[pos : pos + n])
                self.count += n
                self._left -= n
                pos += n
                if self._left == 0:
                    if self.chunked:
                        self._state = _LINE_CRLF
                    else:
                        self.done = True
                continue
            newline = buf.find(b"\n", pos, min(end, pos + _MAX_LINE))
            stop = end if newline < 0 else newline + 1
            self._line += view[pos:stop]
            pos = stop
            if len(self._line) > _MAX_LINE:
                raise ValueError(f"line too long in chunked body: {bytes(self._line[:80])!r}")
            if newline >= 0:
                self._on_line(bytes(self._line))
                self._line.clear()
        return pos

    def _on_line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n"):
            raise ValueError(f"bare LF in chunked body: {line!r}")
        line = line[:-2]
        if self._state == _LINE_CRLF:
            if line:
                raise ValueError(f"chunk data not followed by CRLF: {line[:80]!r}")
            self._state = _LINE_SIZE
        elif self._state == _LINE_SIZE:
            size_text = line.split(b";", 1)[0]
            if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                raise ValueError(f"bad chunk size line {line!r}")
            size = int(size_text, 16)
            if size == 0:
                self._state = _LINE_TRAILER
            else:
                self.chunks += 1
                self._left = size
                self._state = _DATA
        elif not line:  # the empty line ending the trailer section
            self.done = True


# --- the client side ------------------------------------------------------------------------


class StreamClient:
    """One client connection to Portico that streams bodies in and out without holding them."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray(RECV_BUFFER)
        self._pending = b""  # bytes after the response head, not yet given to a decoder

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_head(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        self.sock.sendall(build_request(method, target, headers))

    def read_head(self, deadline: float) -> tuple[int, dict[str, str], BodyDecoder]:
        data = bytearray()
        while (end := data.find(b"\r\n\r\n")) < 0:
            assert len(data) < 64 * KiB, f"response head too large: {bytes(data[:200])!r}"
            assert time.monotonic() < deadline, "no response head in time"
            chunk = self.sock.recv(64 * KiB)
            assert chunk, f"connection closed before a response head; got {bytes(data)!r}"
            data += chunk
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"repeated response header {name}"
            headers[name.lower()] = value.strip()
        self._pending = bytes(data[end + 4 :])
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        assert chunked or "content-length" in headers, f"unframed response: {headers}"
        length = None if chunked else int(headers["content-length"])
        return status, headers, BodyDecoder(length)

    def read_body(
        self,
        body: BodyDecoder,
        deadline: float,
        limit: int | None = None,
    ) -> None:
        """Read into ``body`` until it is complete, or until ``limit`` more bytes were read."""
        if self._pending:
            pending, self._pending = self._pending, b""
            used = body.feed(pending)
            assert used == len(pending), "bytes after the end of the response body"
        got = 0
        while not body.done and (limit is None or got < limit):
            assert time.monotonic() < deadline, f"body not complete in time: {body!r}"
            want = RECV_BUFFER if limit is None else min(RECV_BUFFER, limit - got)
            n = self.sock.recv_into(self.buf, want)
            assert n, f"connection closed inside the body: {body!r}"
            got += n
            used = body.feed(self.buf, 0, n)
            assert used == n, f"{n - used} bytes after the end of the response body"

    def read_small(self, deadline: float) -> tuple[int, bytes]:
        """A whole response with a small Content-Length body: (status, body)."""
        status, _, body = self.read_head(deadline)
        assert not body.chunked and body.remaining <= 64 * KiB, f"not a small response: {body!r}"
        data = bytearray(self._pending)
        self._pending = b""
        while len(data) < body.remaining:
            assert time.monotonic() < deadline, f"response body not complete: {bytes(data)!r}"
            chunk = self.sock.recv(64 * KiB)
            assert chunk, f"connection closed inside the response body: {bytes(data)!r}"
            data += chunk
        assert len(data) == body.remaining, f"bytes after the response: {bytes(data)!r}"
        return status, bytes(data)

    def sender(self, body: Iterator[bytes]) -> BodySender:
        return BodySender(self.sock, body)


class PatternBody:
    """A request body of ``total`` pattern bytes, generated block by block as it is sent, in
    Content-Length or chunked framing; ``digest`` covers the body bytes generated so far."""

    def __init__(self, total: int, *, chunked: bool) -> None:
        self.total = total
        self.chunked = chunked
        self.digest = hashlib.sha256()

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self.chunked:
            return [("Transfer-Encoding", "chunked")]
        return [("Content-Length", str(self.total))]

    def __iter__(self) -> Iterator[bytes]:
        made = index = 0
        while made < self.total:
            block = pattern_block(index)[: self.total - made]
            index += 1
            made += len(block)
            self.digest.update(block)
            if self.chunked:
                yield b"%x\r\n" % len(block)
                yield block
                yield b"\r\n"
            else:
                yield block
        if self.chunked:
            yield b"0\r\n\r\n"


class BodySender:
    """Sends the pieces of a body on a socket, either until the peer stops taking them (a
    stall) or to the end; ``sent`` counts the bytes the kernel accepted."""

    def __init__(self, sock: socket.socket, pieces: Iterator[bytes]) -> None:
        self.sock = sock
        self.pieces = iter(pieces)
        self.view = memoryview(b"")
        self.sent = 0

    def _more(self) -> bool:
        if not self.view:
            piece = next(self.pieces, None)
            if piece is None:
                return False
            self.view = memoryview(piece)
        return True

    def send_until_stalled(self, quiet: float, deadline: float) -> bool:
        """Send without blocking until the socket stays unwritable for ``quiet`` seconds
        (True) or everything is sent (False)."""
        self.sock.setblocking(False)
        try:
            while self._more():
                assert time.monotonic() < deadline, f"no stall after {self.sent} bytes"
                try:
                    n = self.sock.send(self.view)
                except BlockingIOError:
                    if not select.select([], [self.sock], [], quiet)[1]:
                        return True
                    continue
                self.view = self.view[n:]
                self.sent += n
            return False
        finally:
            self.sock.setblocking(True)

    def send_rest(self, deadline: float, timeout: float = 20.0) -> None:
        self.sock.settimeout(timeout)
        while self._more():
            assert time.monotonic() < deadline, f"body not sent in time ({self.sent} bytes)"
            self.sock.sendall(self.view)
            self.sent += len(self.view)
            self.view = memoryview(b"")


# --- a backend that consumes uploads without keeping them -------------------------------------


class _SinkProtocol(asyncio.Protocol):
    def __init__(self, sink: SinkBackend) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.body: BodyDecoder | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sink.protocols.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.protocols.discard(self)

    def data_received(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if self.body is None:
                self.head += data[pos:]
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return
                leftover = bytes(self.head[end + 4 :])
                self.body = BodyDecoder(self._length(bytes(self.head[:end])))
                self.head.clear()
                data, pos = leftover, 0
                if self.sink.holding:
                    self.pause()
            pos = self.body.feed(data, pos)
            if self.body.done:
                self._answer(self.body)
                self.body = None

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
            self.sink.paused.add(self)

    @staticmethod
    def _length(head: bytes) -> int | None:
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "transfer-encoding":
                assert value.strip().lower() == "chunked", f"unexpected coding {value!r}"
                return None
            if name.strip().lower() == "content-length":
                length = int(value)
        return length

    def _answer(self, body: BodyDecoder) -> None:
        summary = {"length": body.count, "sha256": body.sha256, "chunked": body.chunked}
        self.sink.bodies.append(summary)
        payload = json.dumps(summary).encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        assert self.transport is not None
        self.transport.write(head % len(payload) + payload)


@dataclass
class SinkBackend:
    """An HTTP/1.1 backend on 127.0.0.1 that counts and hashes each request body as it
    arrives and answers ``{"length": n, "sha256": hex, "chunked": bool}`` once the body is complete.

    ``RawBackend`` records every byte it receives, so it would keep a 1 GiB upload in this
    process; this one keeps a digest. ``hold()`` makes it stop reading a body after its head
    (a slow backend), ``release()`` lets it read again.
    """

    port: int = field(default_factory=free_port)
    holding: bool = False
    bodies: list[dict[str, Any]] = field(default_factory=list)
    protocols: set[_SinkProtocol] = field(default_factory=set)
    paused: set[_SinkProtocol] = field(default_factory=set)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(5.0), "sink backend did not start"
        assert self._loop is not None, "sink backend failed to listen"
        return self

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        try:
            server = loop.run_until_complete(
                loop.create_server(lambda: _SinkProtocol(self), "127.0.0.1", self.port)
            )
        except OSError:
            ready.set()
            loop.close()
            return
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for proto in list(self.protocols):
                if proto.transport is not None:
                    proto.transport.abort()
            loop.run_until_complete(server.wait_closed())
            loop.close()

    def _call(self, fn: Callable[[], None]) -> None:
        assert self._loop is not None
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        assert done.wait(5.0), "sink backend loop did not respond"

    def hold(self) -> None:
        def hold() -> None:
            self.holding = True

        self._call(hold)

    def release(self) -> None:
        def release() -> None:
            self.holding = False
            for proto in list(self.paused):
                if proto.transport is not None and not proto.transport.is_closing():
                    proto.transport.resume_reading()
            self.paused.clear()

        self._call(release)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5.0)
            assert not thread.is_alive(), "sink backend thread did not stop"


@pytest.fixture
def sink() -> Iterator[SinkBackend]:
    backend = SinkBackend().start()
    try:
        yield backend
    finally:
        backend.stop()


# --- 1 GiB each way -------------------------------------------------------------------------


def first_then(first: Handler, rest: Handler) -> Handler:
    """The backend's first connection is served by ``first``, every later one by ``rest``."""
    served: list[bool] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handle = rest if served else first
        served.append(True)
        await handle(reader, writer)

    return handler


def download_warm_up(proxy: PorticoProcess, deadline: float) -> None:
    """A 4 MiB download on the path under test, so the RSS baseline already includes what a
    first transfer allocates (pools, parser state, transport buffers)."""
    with StreamClient(proxy.port) as client:
        client.send_head("GET", "/warm", [])
        status, _, body = client.read_head(deadline)
        client.read_body(body, deadline)
        assert status == 200 and body.count == 4 * MiB


def upload_warm_up(proxy: PorticoProcess, deadline: float) -> None:
    with StreamClient(proxy.port) as client:
        body = PatternBody(4 * MiB, chunked=False)
        client.send_head("PUT", "/warm", body.headers)
        client.sender(iter(body)).send_rest(deadline)
        status, answer = client.read_small(deadline)
        assert status == 200 and json.loads(answer)["sha256"] == body.digest.hexdigest()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_1gib_download_streams_intact_with_flat_memory(
    chunked: bool, raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    progress = StreamProgress()
    warm = stream_pattern(4 * MiB, StreamProgress(), chunked=chunked)
    backend = raw_backend(first_then(warm, stream_pattern(GiB, progress, chunked=chunked)))
    proxy = portico(proxy_config(backend.url))
    deadline = time.monotonic() + TRANSFER_DEADLINE
    download_warm_up(proxy, deadline)

    with RssSampler(proxy.pid) as sampler, StreamClient(proxy.port) as client:
        started = time.monotonic()
        client.send_head("GET", "/big", [])
        status, headers, body = client.read_head(deadline)
        client.read_body(body, deadline)
        elapsed = time.monotonic() - started

    print(f"\n1 GiB download, {'chunked' if chunked else 'length'}: {elapsed:.1f}s {sampler!r}")
    assert status == 200
    if chunked:
        assert headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in headers
        assert body.chunks > 1
    else:
        assert headers.get("content-length") == str(GiB)
        assert "transfer-encoding" not in headers
    wait_until(lambda: progress.done, 5.0, message="the backend to finish sending")
    assert body.count == GiB
    assert body.sha256 == progress.sha256
    assert_flat(sampler, "1 GiB download")
    assert not backend.errors


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_1gib_upload_streams_intact_with_flat_memory(
    chunked: bool, sink: SinkBackend, portico: PorticoFactory
) -> None:
    proxy = portico(proxy_config(sink.url))
    deadline = time.monotonic() + TRANSFER_DEADLINE
    upload_warm_up(proxy, deadline)

    body = PatternBody(GiB, chunked=chunked)
    with RssSampler(proxy.pid) as sampler, StreamClient(proxy.port) as client:
        started = time.monotonic()
        client.send_head("PUT", "/big", body.headers)
        client.sender(iter(body)).send_rest(deadline)
        status, answer = client.read_small(deadline)
        elapsed = time.monotonic() - started

    print(f"\n1 GiB upload, {'chunked' if chunked else 'length'}: {elapsed:.1f}s {sampler!r}")
    assert status == 200, answer
    expected = {"length": GiB, "sha256": body.digest.hexdigest(), "chunked": chunked}
    assert json.loads(answer) == expected
    assert sink.bodies[-1] == expected
    assert_flat(sampler, "1 GiB upload")


# --- backpressure -----------------------------------------------------------------------------


def wait_for_stall(progress: StreamProgress, quiet: float = 0.5, timeout: float = 10.0) -> int:
    """Wait until the backend has been blocked in drain() with ``progress.sent`` unchanged for
    ``quiet`` seconds; return where it stopped."""
    last = {"sent": -1, "since": 0.0}

    def stalled() -> bool:
        assert not progress.done, f"the whole body left the backend with no reader: {progress}"
        now, sent = time.monotonic(), progress.sent
        if sent != last["sent"] or not progress.waiting_drain:
            last["sent"], last["since"] = sent, now
            return False
        return now - last["since"] >= quiet

    try:
        wait_until(stalled, timeout, interval=0.05, message="the backend's writes to stall")
    except AssertionError as e:
        raise AssertionError(f"{e}; the backend now: {progress}") from None
    return progress.sent


def test_slow_reading_client_stalls_the_backend_not_portico_memory(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    total = 512 * MiB
    progress = StreamProgress()
    warm = stream_pattern(4 * MiB, StreamProgress())
    backend = raw_backend(first_then(warm, stream_pattern(total, progress)))
    proxy = portico(proxy_config(backend.url))
    deadline = time.monotonic() + TRANSFER_DEADLINE
    download_warm_up(proxy, deadline)

    with RssSampler(proxy.pid) as sampler, StreamClient(proxy.port) as client:
        client.send_head("GET", "/big", [])
        status, _, body = client.read_head(deadline)
        assert status == 200

        # The client reads nothing: the backend must end up blocked in drain(), not Portico
        # reading its whole body into memory.
        stalled_at = wait_for_stall(progress)
        assert stalled_at < IN_FLIGHT_LIMIT, f"{stalled_at / MiB:.0f} MiB sent with no reader"
        assert_flat(sampler, "stalled download")

        # The client reads slowly (about 25 MiB/s): the backend moves on as the client reads,
        # never more than the kernel buffers ahead of it.
        waits_before = progress.drain_waits
        max_lag = 0
        for _ in range(128):
            client.read_body(body, deadline, limit=256 * KiB)
            max_lag = max(max_lag, progress.sent - body.count)
            time.sleep(0.01)  # the slow reader's pace, not a wait for a condition
        assert body.count >= 32 * MiB
        assert progress.sent > stalled_at, "the backend did not resume as the client read"
        assert progress.drain_waits > waits_before, "the backend was never held back"
        assert max_lag < IN_FLIGHT_LIMIT, f"backend {max_lag / MiB:.0f} MiB ahead of the client"

        client.read_body(body, deadline)  # then the rest at full speed

    print(
        f"\nslow reader: stalled after {stalled_at / MiB:.1f} MiB, max lag "
        f"{max_lag / MiB:.1f} MiB, {sampler!r}"
    )
    wait_until(lambda: progress.done, 5.0, message="the backend to finish sending")
    assert body.count == total
    assert body.sha256 == progress.sha256
    assert_flat(sampler, "slowly read download")


def test_slow_reading_backend_stalls_the_client_not_portico_memory(
    sink: SinkBackend, portico: PorticoFactory
) -> None:
    total = 512 * MiB
    proxy = portico(proxy_config(sink.url))
    deadline = time.monotonic() + TRANSFER_DEADLINE
    upload_warm_up(proxy, deadline)

    sink.hold()  # the backend reads request heads, then stops reading
    body = PatternBody(total, chunked=False)
    with RssSampler(proxy.pid) as sampler, StreamClient(proxy.port) as client:
        client.send_head("PUT", "/big", body.headers)
        sender = client.sender(iter(body))
        assert sender.send_until_stalled(quiet=1.0, deadline=deadline), "the upload never stalled"
        stalled_at = sender.sent
        assert stalled_at < IN_FLIGHT_LIMIT, f"{stalled_at / MiB:.0f} MiB taken, backend asleep"
        assert_flat(sampler, "stalled upload")

        sink.release()
        sender.send_rest(deadline)
        status, answer = client.read_small(deadline)

    print(f"\nslow backend: client stalled after {stalled_at / MiB:.1f} MiB, {sampler!r}")
    assert status == 200, answer
    assert json.loads(answer) == {
        "length": total,
        "sha256": body.digest.hexdigest(),
        "chunked": False,
    }
    assert_flat(sampler, "upload to a slow backend")


def test_upload_paused_by_portico_does_not_count_as_an_idle_client(
    sink: SinkBackend, portico: PorticoFactory
) -> None:
    """While Portico keeps a client paused because the backend is not reading, the client is
    not idle: body_idle must not cut the upload off with a 408 (configuration.md: time
    Portico itself paused the client does not count)."""
    body_idle = 1.0
    total = 128 * MiB
    proxy = portico(
        proxy_config(sink.url, timeouts={"header": 5, "body_idle": body_idle, "send": 20})
    )
    deadline = time.monotonic() + TRANSFER_DEADLINE
    upload_warm_up(proxy, deadline)

    sink.hold()
    body = PatternBody(total, chunked=True)
    with StreamClient(proxy.port) as client:
        client.send_head("POST", "/big", body.headers)
        sender = client.sender(iter(body))
        assert sender.send_until_stalled(quiet=0.5, deadline=deadline), "the upload never stalled"
        # Paused for 2.5 times body_idle: Portico must neither answer nor close meanwhile.
        if select.select([client.sock], [], [], 2.5 * body_idle)[0]:
            early = client.sock.recv(4096)
            pytest.fail(f"Portico answered a paused upload after {body_idle}s idle: {early!r}")
        sink.release()
        sender.send_rest(deadline)
        status, answer = client.read_small(deadline)

    assert status == 200, answer
    assert json.loads(answer)["sha256"] == body.digest.hexdigest()
