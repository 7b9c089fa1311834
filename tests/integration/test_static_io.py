"""Static files and compression under load and misbehaviour, over real sockets.

A 1 GiB file (sparse, so the test costs no disk) is sent with sendfile and, through the
compress stage, with chunked reads, while Portico's RSS stays flat; 200 clients that leave
mid-file leave no descriptor open; a file rewritten while it is sent is never presented as
complete; Server-Sent Events pass through compression without delay.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import pytest
import zstandard

from tests.conftest import RawBackendFactory
from tests.integration.test_streaming import RSS_GROWTH_LIMIT, RssSampler
from tests.support.behaviours import read_request
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection, build_request
from tests.support.waiting import wait_until

MiB = 1024 * 1024
GiB = 1024 * MiB
RECV_BUFFER = 1 * MiB


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("static-io")
    with open(d / "big.bin", "wb") as f:
        f.truncate(GiB)  # sparse: reads as zeros, takes no disk
    with open(d / "big.txt", "wb") as f:
        f.truncate(GiB)
    with open(d / "mid.bin", "wb") as f:
        f.truncate(64 * MiB)
    return d


@pytest.fixture(scope="module")
def portico(root: Path) -> Iterator[PorticoProcess]:
    config: dict[str, Any] = {
        "server": {"timeouts": {"send": 20}},
        "upstreams": {"app": {"backends": ["http://127.0.0.1:9"]}},
        "routes": [
            {"path": "/f/", "strip_prefix": "/f", "static": {"root": str(root)}},
            {
                "path": "/z/",
                "strip_prefix": "/z",
                "static": {"root": str(root)},
                "compress": {"encodings": ["gzip"], "levels": {"gzip": 1}},
            },
            {"path": "/", "upstream": "app"},
        ],
    }
    proc = PorticoProcess(config).start()
    yield proc
    proc.stop()


def read_response(sock: socket.socket, deadline: float) -> tuple[bytes, int]:
    """(head, body bytes counted) for one response read to its Content-Length or the close."""
    buf = bytearray(RECV_BUFFER)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before the head"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    count = len(rest)
    view = memoryview(buf)
    while time.monotonic() < deadline:
        n = sock.recv_into(view)
        if n == 0:
            break
        count += n
        if b"Content-Length" in head and count >= int(
            head.split(b"Content-Length: ")[1].split(b"\r\n")[0]
        ):
            break
    return head, count


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(300)  # a few seconds alone; minutes when the machine is shared
def test_a_1gib_file_with_sendfile_keeps_memory_flat(portico: PorticoProcess) -> None:
    with (
        socket.create_connection(("127.0.0.1", portico.port), timeout=30) as sock,
        RssSampler(portico.pid) as sampler,
    ):
        sock.sendall(build_request("GET", "/f/big.bin"))
        head, count = read_response(sock, time.monotonic() + 240)
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % GiB in head
    assert count == GiB
    assert sampler.growth < RSS_GROWTH_LIMIT, sampler


@pytest.mark.slow  # about 30 s here: gzip of 1 GiB on a shared core
@pytest.mark.timeout(300)
def test_a_1gib_file_through_compression_keeps_memory_flat(portico: PorticoProcess) -> None:
    decoder = zlib.decompressobj(31)
    total = 0
    with (
        socket.create_connection(("127.0.0.1", portico.port), timeout=30) as sock,
        RssSampler(portico.pid) as sampler,
    ):
        sock.sendall(
            build_request(
                "GET", "/z/big.txt", {"Accept-Encoding": "gzip", "Connection": "close"}
            )
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert b"Content-Encoding: gzip" in head and b"chunked" in head
        raw = bytearray(rest)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            piece = sock.recv(RECV_BUFFER)
            if not piece:
                break
            raw += piece
        # chunked framing: strip it, then decode with bounded output per step
        body = bytearray()
        pos = 0
        while True:
            line_end = raw.index(b"\r\n", pos)
            size = int(raw[pos:line_end], 16)
            if size == 0:
                break
            body += raw[line_end + 2 : line_end + 2 + size]
            pos = line_end + 4 + size
        view = bytes(body)
        while view:
            out = decoder.decompress(view, 64 * MiB)
            total += len(out)
            view = decoder.unconsumed_tail
    assert decoder.eof
    assert total == GiB
    assert sampler.growth < RSS_GROWTH_LIMIT, sampler


@pytest.mark.timeout(300)
def test_a_client_that_stops_reading_stops_the_file_reads(
    portico: PorticoProcess, root: Path
) -> None:
    """Through compression (chunked reads, not sendfile): a stalled client pauses reading the
    file. Random bytes barely compress, so buffering them would show in RSS at once."""
    path = root / "random.txt"
    size = 96 * MiB
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    try:
        with socket.create_connection(("127.0.0.1", portico.port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            with RssSampler(portico.pid) as sampler:
                sock.sendall(
                    build_request(
                        "GET", "/z/random.txt", {"Accept-Encoding": "gzip", "Connection": "close"}
                    )
                )
                time.sleep(3)  # the stall itself is what is measured: nothing to wait on
                stalled_growth = sampler.growth
                decoder = zlib.decompressobj(31)
                raw = bytearray()
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    piece = sock.recv(RECV_BUFFER)
                    if not piece:
                        break
                    raw += piece
        assert stalled_growth < RSS_GROWTH_LIMIT, sampler
        assert sampler.growth < RSS_GROWTH_LIMIT, sampler
        head, _, body = bytes(raw).partition(b"\r\n\r\n")
        assert b"Content-Encoding: gzip" in head
        plain = bytearray()
        pos = 0
        while True:
            line_end = body.index(b"\r\n", pos)
            n = int(body[pos:line_end], 16)
            if n == 0:
                break
            plain += decoder.decompress(body[line_end + 2 : line_end + 2 + n])
            pos = line_end + 4 + n
        assert len(plain) == size
    finally:
        path.unlink()


@pytest.mark.timeout(300)
def test_clients_leaving_mid_file_leak_no_descriptors(portico: PorticoProcess) -> None:
    # Warm up so the baseline includes whatever the process opens once (e.g. the listener).
    with RawConnection(portico.port) as conn:
        conn.send(build_request("HEAD", "/f/mid.bin"))
        assert conn.recv_response(head=True).status == 200
    baseline = open_fds(portico.pid)
    started = time.monotonic()
    for i in range(200):
        sock = socket.create_connection(("127.0.0.1", portico.port), timeout=10)
        target = "/f/mid.bin" if i % 4 else "/z/big.txt"  # sendfile and read paths alike
        sock.sendall(build_request("GET", target, {"Accept-Encoding": "gzip"}))
        got = 0
        while got < 100_000:  # some of the body, then leave
            piece = sock.recv(65536)
            assert piece
            got += len(piece)
        if i % 2:
            # a reset, as a killed client would leave
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert time.monotonic() - started < 240
    wait_until(
        lambda: open_fds(portico.pid) <= baseline,
        timeout=15,
        message=f"descriptors back to {baseline}",
    )
    # and the server still serves
    with RawConnection(portico.port) as conn:
        conn.send(build_request("GET", "/f/mid.bin", {"Range": "bytes=0-9"}))
        assert conn.recv_response().body == b"\0" * 10


def test_a_file_rewritten_while_sent_is_not_presented_as_complete(
    portico: PorticoProcess, root: Path
) -> None:
    path = root / "changing.bin"
    size = 64 * MiB
    path.write_bytes(b"a" * size)
    try:
        with socket.create_connection(("127.0.0.1", portico.port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(build_request("GET", "/f/changing.bin"))
            data = sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200")
            # the client stalls; meanwhile the file is rewritten in place
            with open(path, "r+b") as f:
                f.seek(size // 2)
                f.write(b"b" * 1024)
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
            rest = data.partition(b"\r\n\r\n")[2]
            count = len(rest)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    piece = sock.recv(RECV_BUFFER)
                except ConnectionResetError:
                    break
                if not piece:
                    break
                count += len(piece)
        assert count < size  # cut short: never a complete response of two versions
    finally:
        path.unlink()


# --- SSE through compression --------------------------------------------------------------------

EVENTS = 8
EVENT_GAP = 0.15


def sse_backend(sent_at: list[float]) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await read_request(reader) is None:
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        for i in range(EVENTS):
            await asyncio.sleep(EVENT_GAP)
            event = b"id: %d\ndata: event number %d\n\n" % (i, i)
            sent_at.append(time.monotonic())
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    return handler


class Decoder:
    def __init__(self, coding: str) -> None:
        self.coding = coding
        if coding == "gzip":
            self.z: Any = zlib.decompressobj(31)
        elif coding == "br":
            self.z = brotli.Decompressor()
        else:
            self.z = zstandard.ZstdDecompressor().decompressobj()

    def feed(self, data: bytes) -> bytes:
        if self.coding == "br":
            out: bytes = self.z.process(data)
            return out
        out = self.z.decompress(data)
        return out


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_sse_through_compression_arrives_without_delay(
    raw_backend: RawBackendFactory, coding: str
) -> None:
    sent_at: list[float] = []
    backend = raw_backend(sse_backend(sent_at))
    config = {
        "upstreams": {"app": {"backends": [backend.url]}},
        "routes": [{"path": "/", "upstream": "app", "compress": True}],
    }
    with (
        PorticoProcess(config) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock,
    ):
        sock.sendall(build_request("GET", "/events", {"Accept-Encoding": coding}))
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += sock.recv(65536)
        head, _, raw = raw.partition(b"\r\n\r\n")
        assert f"Content-Encoding: {coding}".encode() in head, head
        decoder = Decoder(coding)
        text = b""
        arrived: list[float] = []
        lock = threading.Lock()
        deadline = time.monotonic() + 20
        while len(arrived) < EVENTS and time.monotonic() < deadline:
            # strip the chunked framing of whatever has arrived
            while True:
                line_end = raw.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(raw[:line_end], 16)
                if len(raw) < line_end + 4 + size:
                    break
                if size:
                    text += decoder.feed(raw[line_end + 2 : line_end + 2 + size])
                raw = raw[line_end + 4 + size :]
                if size == 0:
                    break
            now = time.monotonic()
            with lock:
                while text.count(b"\n\n") > len(arrived):
                    arrived.append(now)
            if len(arrived) < EVENTS:
                raw += sock.recv(65536)
    assert len(arrived) == EVENTS, text
    delays = [a - s for a, s in zip(arrived, sent_at, strict=True)]
    assert max(delays) < 0.05, delays
    assert text == b"".join(b"id: %d\ndata: event number %d\n\n" % (i, i) for i in range(EVENTS))
