"""CORS in a real browser: headless Chromium (Debian's, driven by Playwright) loads a page
from one origin and fetches through Portico on another, with and without credentials, and
sends a preflighted request to a route behind JWT authentication: the gateway answers the
preflight before authentication, so the real request (with its token) goes through."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.support.backends import GunicornFlask
from tests.support.ports import free_port

CHROMIUM = "/usr/bin/chromium"
SECRET = b"0123456789abcdef0123456789abcdef-test-secret"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (scripts/test.sh installs it)"
)


class PageServer:
    """Serves one empty HTML page: the origin the browser's fetches come from."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"<!doctype html><title>page</title><p>page</p>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install '.[test]')")
    profile = tempfile.mkdtemp(prefix="portico-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
            ],
        )  # fmt: skip
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def app() -> Iterator[GunicornFlask]:
    with GunicornFlask("app", worker_class="gthread") as backend:
        yield backend


@pytest.fixture
def pages() -> Iterator[tuple[PageServer, PageServer]]:
    with PageServer() as allowed, PageServer() as other:
        yield allowed, other


FETCH = """async ([url, init]) => {
    try {
        const r = await fetch(url, init);
        return {status: r.status, body: await r.text(), user: r.headers.get("X-Backend-User")};
    } catch (e) {
        return {error: String(e)};
    }
}"""


def test_browser_cors_with_and_without_credentials_and_preflight_before_auth(
    portico: Any, app: GunicornFlask, browser: Any, pages: tuple[PageServer, PageServer],
    tmp_path: Path,
) -> None:
    allowed, other = pages
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    cors = {"origins": [allowed.origin], "credentials": True, "headers": ["Authorization",
            "Content-Type"], "expose_headers": ["X-Backend-User"], "max_age": 0}
    proxy = portico({
        "server": {"shutdown_grace": 0.5},
        "access_log": {"format": "common"},
        "upstreams": {"app": {"backends": [app.url]}},
        "routes": [
            {"path": "/public/", "strip_prefix": "/public", "upstream": "app",
             "cors": {"origins": [allowed.origin]}},
            {"path": "/api/", "strip_prefix": "/api", "upstream": "app", "cors": cors,
             "auth": {"jwt": {"algorithms": ["HS256"], "secret_file": str(secret),
                              "cookie": "session", "forward_claims": {"X-User": "sub"}}},
             "response_headers": {"set": {"X-Backend-User": "seen"}}},
        ],
    })  # fmt: skip
    gateway = f"http://127.0.0.1:{proxy.port}"
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    page = browser.new_page()
    try:
        page.goto(allowed.origin + "/")
        # Without credentials, to a route with CORS for this origin: readable.
        public = page.evaluate(FETCH, [gateway + "/public/whoami", {}])
        assert public.get("status") == 200, public
        assert '"instance"' in public["body"]
        # The same route from an origin it does not allow: the browser blocks the read.
        page.goto(other.origin + "/")
        blocked = page.evaluate(FETCH, [gateway + "/public/whoami", {}])
        assert "error" in blocked, blocked
        page.goto(allowed.origin + "/")
        # The authenticated route: with no credentials, a 401 the page can read (CORS
        # headers are on refusals too).
        anonymous = page.evaluate(FETCH, [gateway + "/api/echo", {"credentials": "omit"}])
        assert anonymous.get("status") == 401, anonymous
        # With credentials: the session cookie carries the token.
        browser.add_cookies([{"name": "session", "value": token, "url": gateway}])
        with_cookie = page.evaluate(FETCH, [gateway + "/api/echo", {"credentials": "include"}])
        assert with_cookie.get("status") == 200, with_cookie
        assert '"X-User":"alice"' in with_cookie["body"].replace(" ", "")
        assert with_cookie["user"] == "seen"  # an exposed header is readable
        browser.clear_cookies()
        # A preflighted request (PUT with Authorization and JSON): the OPTIONS preflight has
        # no token; the gateway answers it before the JWT stage, then the PUT goes through.
        put = page.evaluate(FETCH, [gateway + "/api/echo", {
            "method": "PUT", "body": "{}",
            "headers": {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        }])  # fmt: skip
        assert put.get("status") == 200, put
        assert '"method":"PUT"' in put["body"].replace(" ", "")
        # The browser did preflight, and the gateway answered it (the access log).
        assert 'OPTIONS /api/echo HTTP/1.1" 204' in proxy.output(), proxy.output()[-2000:]
        # From an origin the route does not allow, the preflight is refused: no PUT.
        page.goto(other.origin + "/")
        refused = page.evaluate(FETCH, [gateway + "/api/echo", {
            "method": "PUT", "body": "{}",
            "headers": {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        }])  # fmt: skip
        assert "error" in refused, refused
    finally:
        page.close()
