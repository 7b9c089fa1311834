"""A forward-auth service for the tests (what nginx auth_request or Traefik forwardAuth would
ask), run under gunicorn by ``AuthService``.

``Authorization: Bearer good`` -> 204 with ``X-Auth-User: alice`` and what it was asked
(``X-Auth-Saw``); ``Bearer slow`` -> answers after 3 s; ``Bearer login`` -> 302 to a login
page with a cookie; anything else -> 401 with its own body and challenge.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Self

from flask import Flask, Response, request

from tests.support.lifecycle import StartStop
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess
from tests.support.waiting import port_accepts, wait_until

app = Flask(__name__)


@app.route("/auth", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def auth() -> Response:
    token = request.headers.get("Authorization", "")
    if token == "Bearer slow":
        time.sleep(3)
    if token == "Bearer good":
        resp = Response(status=204)
        resp.headers["X-Auth-User"] = "alice"
        resp.headers["X-Auth-Secret"] = "not copied"
        saw = [
            request.method,
            request.headers.get("X-Forwarded-Method", ""),
            request.headers.get("X-Forwarded-Uri", ""),
            request.headers.get("X-Forwarded-Host", ""),
            request.headers.get("Cookie", "-"),
            request.headers.get("X-Other", "-"),
        ]
        resp.headers["X-Auth-Saw"] = " | ".join(saw)
        return resp
    if token == "Bearer login":
        resp = Response("see the login page\n", status=302)
        resp.headers["Location"] = "https://login.example.test/?rd=" + request.headers.get(
            "X-Forwarded-Uri", ""
        )
        resp.headers["Set-Cookie"] = "state=xyz; Path=/"
        return resp
    return Response(
        "denied by the auth service\n",
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="svc"'},
        mimetype="text/plain",
    )


class AuthService(StartStop):
    def __init__(self) -> None:
        self.port = free_port()
        root = Path(__file__).resolve().parents[2]
        self.process = ManagedProcess(
            [
                sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{self.port}",
                "--worker-class", "gthread", "--threads", "8", "--graceful-timeout", "1",
                "tests.support.authservice:app",
            ],
            cwd=root,
            name="gunicorn-auth",
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth"

    def start(self, timeout: float = 20.0) -> Self:
        self.process.start()
        wait_until(lambda: port_accepts(self.port), timeout, message="auth service")
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.process.stop(timeout=timeout)

    def output(self) -> str:
        return self.process.output()
