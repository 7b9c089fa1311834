"""The test support works on its own: backends answer, raw servers record, the raw client
parses, and every process a helper starts is really gone after it stops."""

from __future__ import annotations

import hashlib
import sys
import textwrap
import time
import tomllib
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import GunicornFactory, PorticoFactory, RawBackendFactory
from tests.support.backends import (
    GunicornFlask,
    RawBackend,
    close_after_headers,
    close_after_request,
    close_immediately,
    echo_http,
    garbage,
    never_respond,
    reset_mid_body,
    respond,
    slow_headers,
)
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess, process_gone
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import (
    IncompleteResponse,
    MalformedResponse,
    RawConnection,
    build_request,
    chunked,
    send_raw,
)
from tests.support.tomlwriter import dumps
from tests.support.waiting import port_accepts, wait_for_port, wait_until


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # trust_env=False: a proxy set in the environment must never see loopback test traffic.
    with httpx.Client(trust_env=False, timeout=5.0) as c:
        yield c


def pattern(n: int) -> bytes:
    """What the Flask app's /bytes/<n> sends."""
    return bytes(i % 256 for i in range(n))


# --- gunicorn + Flask -----------------------------------------------------------------------


def test_flask_backends_are_three_distinct_instances(
    flask_backends: list[GunicornFlask], client: httpx.Client
) -> None:
    answers = [client.get(f"{b.url}/whoami").json() for b in flask_backends]
    assert [a["instance"] for a in answers] == ["a", "b", "c"]
    assert [a["port"] for a in answers] == [b.port for b in flask_backends]
    for answer, backend in zip(answers, flask_backends, strict=True):
        assert answer["pid"] in backend.worker_pids()
    page = client.get(flask_backends[1].url + "/")
    assert "Answered by b" in page.text


def test_flask_counter_skips_health(
    flask_backends: list[GunicornFlask], client: httpx.Client
) -> None:
    url = flask_backends[0].url
    first = client.get(f"{url}/whoami").json()["count"]
    client.get(f"{url}/health")
    assert client.get(f"{url}/whoami").json()["count"] == first + 1


def test_flask_echo_reports_body_digest(
    flask_backends: list[GunicornFlask], client: httpx.Client
) -> None:
    body = bytes(range(256)) * 1000
    answer = client.put(
        f"{flask_backends[0].url}/echo?x=1&y=%20z", content=body, headers={"X-Test": "yes"}
    ).json()
    assert answer["method"] == "PUT"
    assert answer["path"] == "/echo?x=1&y=%20z"
    assert answer["headers"]["X-Test"] == "yes"
    assert answer["body_length"] == len(body)
    assert answer["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_flask_gthread_reads_chunked_uploads_and_streams_bytes(
    gunicorn_flask: GunicornFactory, client: httpx.Client
) -> None:
    backend = gunicorn_flask("threaded", worker_class="gthread", threads=2)
    pieces = [b"a" * 70_000, b"b" * 5, b"c" * 100_000]
    answer = client.post(f"{backend.url}/echo", content=iter(pieces)).json()
    assert answer["headers"]["Transfer-Encoding"] == "chunked"
    assert answer["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()

    with RawConnection(backend.port) as conn:
        streamed = conn.request("GET", "/bytes/100000")
        assert streamed.chunked and streamed.header("content-length") is None
        assert streamed.body == pattern(100_000)
        sized = conn.request("GET", "/bytes/1000?cl=1")  # same connection: gthread keeps alive
        assert not sized.chunked and sized.header("content-length") == "1000"
        assert sized.body == pattern(1000)
        assert conn.request("GET", "/status/418").status == 418
        assert conn.request("GET", "/headers", headers={"X-A": "1"}).json()["X-A"] == "1"


def test_gunicorn_master_and_workers_are_gone_after_stop() -> None:
    with GunicornFlask("short-lived", workers=2) as backend:
        # /health answers as soon as one worker is up; the second may still be booting.
        wait_until(lambda: len(backend.worker_pids()) == 2, message="two gunicorn workers")
        pids = [backend.pid, *backend.worker_pids()]
    assert backend.process.returncode == 0
    wait_until(lambda: all(process_gone(p) for p in pids), 5, message=f"{pids} to exit")
    assert not port_accepts(backend.port)


# --- ManagedProcess -------------------------------------------------------------------------

# A leader that ignores SIGTERM and has a child in its group: stop() must escalate to SIGKILL
# and take the child with it.
STUBBORN = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("child", child.pid, flush=True)
    time.sleep(60)
    """
)


def test_managed_process_escalates_to_sigkill_on_the_group() -> None:
    proc = ManagedProcess([sys.executable, "-c", STUBBORN], name="stubborn").start()
    try:
        wait_until(lambda: "child" in proc.output(), 10)
        child = int(proc.output().split()[1])
        assert set(proc.group_pids()) == {proc.pid, child}
        started = time.monotonic()
        assert proc.stop(timeout=0.5) == -9
        assert time.monotonic() - started < 5
    finally:
        proc.stop()
    wait_until(lambda: process_gone(child), 5, message="the child to be killed")
    assert process_gone(proc.pid)


def test_managed_process_graceful_stop_and_output() -> None:
    code = "import time; print('hello', flush=True); time.sleep(60)"
    with ManagedProcess([sys.executable, "-c", code]) as proc:
        wait_until(lambda: "hello" in proc.output(), 10)
        assert proc.alive() and proc.rss() > 0
    assert proc.returncode == -15
    assert proc.output() == "hello\n"


# --- RawBackend and the raw client ----------------------------------------------------------


def test_raw_backend_records_every_byte_per_connection(raw_backend: RawBackendFactory) -> None:
    backend = raw_backend(respond(keep_alive=False))
    first = build_request("POST", "/a", body=b"hello")
    second = build_request("GET", "/b", headers=[("X-Dup", "1"), ("X-Dup", "2")])
    assert send_raw(backend.port, first).endswith(b"\r\n\r\nok")
    assert send_raw(backend.port, second).startswith(b"HTTP/1.1 200 OK\r\n")
    wait_until(lambda: backend.connections == 2 and all(r.closed for r in backend.records))
    assert backend.received == [first, second]
    assert backend.errors == []


def test_raw_backend_stop_ends_connections_and_thread() -> None:
    backend = RawBackend(never_respond()).start()
    assert backend.running
    conn = RawConnection(backend.port)
    try:
        conn.send(b"GET / HTTP/1.1\r\n")
        wait_until(lambda: backend.received == [b"GET / HTTP/1.1\r\n"])
        backend.stop()
        assert conn.closed(timeout=2)
    finally:
        conn.close()
        backend.stop()
    assert not backend.running
    assert not port_accepts(backend.port)


def test_rawhttp_parses_content_length_chunked_and_close_delimited(
    raw_backend: RawBackendFactory,
) -> None:
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhello"
    body = chunked([b"hel", b"lo ", b"world"], trailers=[("X-Sum", "abc")])
    chunked_response = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    with RawConnection(raw_backend(respond(sized)).port) as conn:
        conn.send(build_request() * 2)  # pipelined
        first, second = conn.recv_response(), conn.recv_response()
        assert (first.status, first.reason, first.body) == (200, "OK", b"hello")
        assert first.header_values("x-a") == ["1", "2"]
        assert first.raw == sized and second.raw == sized
        assert conn.pending == b""
    with RawConnection(raw_backend(respond(chunked_response)).port) as conn:
        response = conn.request("POST", "/", body=b"x")
        assert (response.status, response.body, response.chunked) == (201, b"hello world", True)
        assert response.trailers == [("X-Sum", "abc")]
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    with RawConnection(raw_backend(respond(until_close, keep_alive=False)).port) as conn:
        assert conn.request().body == b"all of it"
        assert conn.closed()


def test_rawhttp_head_and_no_body_statuses(raw_backend: RawBackendFactory) -> None:
    # A HEAD answer carries Content-Length but no body: parsing it as a body would hang.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"
    with RawConnection(raw_backend(respond(head)).port) as conn:
        assert conn.request("HEAD").body == b""
        assert conn.request("HEAD").header("content-length") == "50"
    not_modified = b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"
    with RawConnection(raw_backend(respond(not_modified)).port) as conn:
        assert conn.request().status == 304


def test_echo_http_describes_pipelined_requests(raw_backend: RawBackendFactory) -> None:
    backend = raw_backend(echo_http())
    upload = build_request(
        "POST", "/up?q=1", [("Transfer-Encoding", "chunked")], chunked([b"ab", b"cd"])
    )
    last = build_request("GET", "/last", [("Connection", "close")])
    with RawConnection(backend.port) as conn:
        conn.send(upload + build_request("DELETE", "/x") + last)
        answers = [conn.recv_response() for _ in range(3)]
        assert conn.closed()
    summaries = [a.json() for a in answers]
    assert [s["method"] for s in summaries] == ["POST", "DELETE", "GET"]
    assert [s["request_number"] for s in summaries] == [1, 2, 3]
    assert summaries[0]["target"] == "/up?q=1"
    assert summaries[0]["chunked"] and summaries[0]["body_length"] == 4
    assert summaries[0]["body_sha256"] == hashlib.sha256(b"abcd").hexdigest()
    assert ["Connection", "close"] in summaries[2]["headers"]
    assert answers[2].header("connection") == "close"
    assert answers[1].header("x-echo-target") == "/x"
    assert backend.received == [upload + build_request("DELETE", "/x") + last]


def test_slow_headers_completes_after_the_delay(raw_backend: RawBackendFactory) -> None:
    with RawConnection(raw_backend(slow_headers(0.5)).port) as conn:
        conn.send(build_request())
        with pytest.raises(TimeoutError):
            conn.recv_response(timeout=0.1)
        assert conn.recv_response(timeout=5).body == b"ok"


def test_never_respond_holds_the_connection(raw_backend: RawBackendFactory) -> None:
    backend = raw_backend(never_respond())
    with RawConnection(backend.port) as conn:
        conn.send(build_request())
        assert not conn.closed(timeout=0.3)
        assert conn.pending == b""
    wait_until(lambda: backend.records[0].peer_closed)


@pytest.mark.parametrize(
    ("behaviour", "check"),
    [
        (close_after_request, lambda e: not e.reset and e.partial == b""),
        (close_after_headers, lambda e: e.partial.endswith(b"Content-Length: 100\r\n\r\n")),
        (reset_mid_body, lambda e: e.reset and e.partial.endswith(b"x" * 100)),
        (close_immediately, lambda e: e.partial == b""),
    ],
)
def test_broken_responses_raise_incomplete(
    raw_backend: RawBackendFactory,
    behaviour: Callable[[], object],
    check: Callable[[IncompleteResponse], bool],
) -> None:
    backend = raw_backend(behaviour())  # type: ignore[arg-type]
    with RawConnection(backend.port) as conn:
        conn.send(build_request())
        with pytest.raises(IncompleteResponse) as info:
            conn.recv_response()
    assert check(info.value), info.value


def test_garbage_is_malformed(raw_backend: RawBackendFactory) -> None:
    with RawConnection(raw_backend(garbage()).port) as conn, pytest.raises(MalformedResponse):
        conn.request()


# --- waiting, TOML --------------------------------------------------------------------------


def test_wait_until_returns_the_value_or_fails_with_the_message() -> None:
    assert wait_until(lambda: 42, timeout=0.1) == 42
    started = time.monotonic()
    with pytest.raises(AssertionError, match="the impossible"):
        wait_until(lambda: False, timeout=0.2, message="the impossible")
    assert 0.2 <= time.monotonic() - started < 2
    with pytest.raises(AssertionError, match="accept connections"):
        wait_for_port(free_port(), timeout=0.2)


def test_toml_writer_round_trips() -> None:
    data = {
        "title": 'quote " backslash \\ tab \t del \x7f é',
        "server": {"listen": ["127.0.0.1:1"], "workers": 2, "grace": 1.5, "on": False},
        "upstreams": {
            "my app": {"backends": [{"url": "http://h:1", "weight": 3}], "mixed": [{"a": 1}, 2]}
        },
        "routes": [{"path": "/a", "upstream": "x"}, {"path": "/", "upstream": "y"}],
        "empty": {},
        "skipped": None,
    }
    expected = {k: v for k, v in data.items() if v is not None}
    assert tomllib.loads(dumps(data)) == expected


# --- PorticoProcess -------------------------------------------------------------------------


def test_portico_process_proxies_and_stops(
    portico: PorticoFactory,
    flask_backends: list[GunicornFlask],
    raw_backend: RawBackendFactory,
    client: httpx.Client,
) -> None:
    echo = raw_backend(echo_http())
    config = {
        "server": {"shutdown_grace": 2.0},
        "upstreams": {
            "app": {"backends": [b.url for b in flask_backends], "balancer": "round_robin"},
            "raw": {"backends": [echo.url]},
        },
        "routes": [{"path": "/raw", "upstream": "raw"}, {"path": "/", "upstream": "app"}],
    }
    proxy = portico(config)
    instances = {client.get(f"{proxy.url}/whoami").json()["instance"] for _ in range(6)}
    assert instances == {"a", "b", "c"}
    assert client.get(f"{proxy.url}/raw/hi").json()["target"] == "/raw/hi"
    assert echo.received[0].startswith(b"GET /raw/hi HTTP/1.1\r\n")
    assert proxy.rss() > 0
    pid = proxy.pid
    assert proxy.stop() == 0
    assert process_gone(pid)
    assert not port_accepts(proxy.port)


def test_portico_process_accepts_raw_toml(
    portico: PorticoFactory, raw_backend: RawBackendFactory
) -> None:
    backend, port = raw_backend(respond()), free_port()
    proxy = portico(
        f'[server]\nlisten = "127.0.0.1:{port}"\n\n[upstreams.only]\nbackends = ["{backend.url}"]\n'
    )
    assert proxy.port == port
    with RawConnection(port) as conn:
        assert conn.request().body == b"ok"


def test_portico_process_fails_fast_with_the_output() -> None:
    proxy = PorticoProcess({"server": {"bogus": 1}, "upstreams": {"a": {"backends": []}}})
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)exited with code 2.*server\.bogus"):
        proxy.start(timeout=15)
    assert time.monotonic() - started < 10
    assert process_gone(proxy.pid)
