"""Stopping instances Portico runs: the drain wait and the forced kill, with apps that do not
help.

gunicorn and the test containers finish their own requests on SIGTERM, which hides whether
Portico waited for them. The app here dies at once on SIGTERM (Python's default), so only
Portico's drain wait can save a request in flight; with ``IGNORE_TERM=1`` it ignores SIGTERM,
so only the SIGKILL after ``stop_timeout`` can stop it. Requests to ``/hold`` are held until
the test creates the release file (at most 20 s).
"""

from __future__ import annotations

import http.client
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration.test_orchestration import (
    FAST,
    Fleet,
    Reply,
    _finish,
    _serve,
    get,
    log_time,
    wait_gone,
)

pytestmark = pytest.mark.timeout(90)

# Dies at once on SIGTERM unless IGNORE_TERM=1. Answers JSON naming itself; /hold waits for
# $RELEASE_FILE, /sleep/S sleeps S seconds, /burn/S spends S seconds of CPU.
HOLDING_APP = """\
import json, os, signal, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTANCE = os.environ["PORTICO_INSTANCE"]
RELEASE = os.environ.get("RELEASE_FILE", "")
if os.environ.get("IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path.startswith("/hold"):
            print(f"holding {self.path}", flush=True)
            deadline = time.monotonic() + 20
            while not os.path.exists(RELEASE) and time.monotonic() < deadline:
                time.sleep(0.01)
        elif self.path.startswith("/sleep/"):
            time.sleep(float(self.path.split("/")[2]))
        elif self.path.startswith("/burn/"):
            end = time.thread_time() + float(self.path.split("/")[2])
            while time.thread_time() < end:
                pass
        body = json.dumps({"instance": INSTANCE, "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

ServeFactory = Callable[[dict[str, Any]], Fleet]


@pytest.fixture
def serve(request: pytest.FixtureRequest) -> Iterator[ServeFactory]:
    """Factory: ``serve(config)`` runs ``portico serve -c`` and waits until it listens; stopped
    at teardown, which fails if any process Portico started outlives it."""
    fleets: list[Fleet] = []

    def start(config: dict[str, Any]) -> Fleet:
        f = _serve(config)
        fleets.append(f)
        return f.start()

    yield start
    _finish(fleets, getattr(getattr(request.node, "rep_call", None), "failed", False))


def holding_app(tmp_path: Path, **app: Any) -> dict[str, Any]:
    """An ``[upstreams.default.app]`` table running HOLDING_APP, with fast windows."""
    script = tmp_path / "holding_app.py"
    script.write_text(HOLDING_APP)
    env = {"RELEASE_FILE": str(tmp_path / "release"), **app.pop("env", {})}
    return {**FAST, "command": [sys.executable, str(script), "{port}"], "env": env, **app}


def config_for(app: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    return {"server": {"shutdown_grace": 5.0}, "upstreams": {"default": {"app": app, **upstream}}}


def cookie_of(reply_headers: list[tuple[str, str]]) -> str:
    for name, value in reply_headers:
        if name.lower() == "set-cookie" and value.startswith("portico_backend="):
            return value.split(";", 1)[0]
    raise AssertionError(f"no sticky cookie in {reply_headers}")


def get_with_headers(
    port: int, target: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
    """Status, JSON body (empty unless 200) and headers of one GET on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if resp.status == 200 else {}, resp.getheaders()
    finally:
        conn.close()


def test_a_request_in_flight_survives_its_instance_draining_even_if_the_app_dies_on_sigterm(
    serve: ServeFactory, tmp_path: Path
) -> None:
    app = holding_app(tmp_path, min=1, max=1, drain_timeout=15.0)
    f = serve(config_for(app, retry={"attempts": 1}, sticky={}))
    f.wait_ready(1)
    status, old, headers = get_with_headers(f.port, "/whoami", {})
    assert status == 200
    cookie = cookie_of(headers)

    replies: list[Reply | BaseException] = []

    def client() -> None:
        try:
            replies.append(get(f.port, "/hold/report"))
        except Exception as e:
            replies.append(e)

    held = threading.Thread(target=client)
    held.start()
    try:
        f.wait_log(rf"\[{old['instance']}\] holding /hold/report$")
        f.process.signal(signal.SIGUSR1)  # rolling restart: a new instance, then drain the old
        f.wait_log(rf"\] {old['instance']} draining \(rolling restart\)$")
        # Draining: the old instance's sticky cookie is not obeyed; the new one serves.
        for _ in range(3):
            status, data, _ = get_with_headers(f.port, "/whoami", {"Cookie": cookie})
            assert status == 200 and data["instance"] != old["instance"], data
        # Nothing has stopped the old instance meanwhile: it dies at once on SIGTERM, so a
        # stop now would have failed the held request already.
        held.join(0.5)
        assert held.is_alive() and replies == [], replies
        assert psutil.pid_exists(old["pid"])
        (tmp_path / "release").touch()
    finally:
        (tmp_path / "release").touch()
        held.join(30)
    [reply] = replies
    assert isinstance(reply, Reply) and reply.status == 200, reply
    assert reply.json()["instance"] == old["instance"]
    [stopped] = f.wait_log(rf"\] {old['instance']} stopped \(rolling restart\)$")
    assert log_time(stopped.string) >= reply.ended - 0.1, "stopped before the request finished"
    wait_gone([old["pid"]])


def test_an_instance_that_ignores_sigterm_is_killed_after_stop_timeout(
    serve: ServeFactory, tmp_path: Path
) -> None:
    app = holding_app(tmp_path, min=1, max=1, stop_timeout=1.0, env={"IGNORE_TERM": "1"})
    f = serve(config_for(app))
    f.wait_ready(1)
    old = get(f.port).json()
    f.process.signal(signal.SIGUSR1)
    [draining] = f.wait_log(rf"\] {old['instance']} draining \(rolling restart\)$")
    [killed] = f.wait_log(rf"\] {old['instance']} did not stop in 1s: SIGKILL$")
    [stopped] = f.wait_log(rf"\] {old['instance']} stopped \(rolling restart\)$")
    waited = log_time(killed.string) - log_time(draining.string)
    assert 0.9 <= waited < 5.0, f"SIGKILL {waited:.2f}s after the drain began"
    assert log_time(stopped.string) >= log_time(killed.string)
    wait_gone([old["pid"]])
    assert get(f.port).status == 200  # the new instance serves
    started = time.monotonic()
    assert f.stop() == []  # shutdown force-kills the new one too, within its stop_timeout
    assert time.monotonic() - started < 10
