"""The dashboard in headless Chromium (Debian's /usr/bin/chromium) driven by Playwright: the
page loads with no console error, its numbers move under load, the Drain button drains an
endpoint (confirmed in the dialog) and the page shows it, the Scale button starts an
instance, Weight and Undrain (and Cancel, which changes nothing) and Restart do what they say.
The run saves docs/img/dashboard.png for docs/operations.md."""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.admin import TOKEN, AdminClient, with_admin
from tests.support.backends import FLASK_APP_DIR
from tests.support.fleet import fleet, request, spread

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).parents[2] / "docs" / "img" / "dashboard.png"
# Milliseconds the page gets to show a change: a tick is 1 s, an instance starts in ~1 s.
SHOW_MS = 20_000
# Bounded load: at most this many requests, from this many threads.
LOAD_REQUESTS = 300
LOAD_THREADS = 3

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="playwright is not installed (pip install -e '.[test]')",
    ),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is missing (scripts/test.sh installs Debian's chromium)",
    ),
]


def load(port: int, stop: threading.Event) -> None:
    """GETs until ``stop`` or LOAD_REQUESTS in all, spread over LOAD_THREADS threads."""
    per_thread = LOAD_REQUESTS // LOAD_THREADS

    def run() -> None:
        for i in range(per_thread):
            if stop.is_set():
                return
            request(port, "GET", "/app/whoami" if i % 3 == 0 else "/")

    threads = [threading.Thread(target=run) for _ in range(LOAD_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_dashboard(portico: PorticoFactory, raw_backend: RawBackendFactory, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    a, b = fleet(raw_backend, "a", "b")
    config: dict[str, Any] = with_admin(
        {
            "server": {"shutdown_grace": 2.0},
            "upstreams": {
                "pool": {"backends": [a.url, b.url]},
                "web": {
                    "app": {
                        "wsgi": "app:app",
                        "cwd": str(FLASK_APP_DIR),
                        "min": 1,
                        "max": 3,
                        "ready_interval": 0.05,
                        "drain_timeout": 2.0,
                    }
                },
            },
            "routes": [
                {"name": "app", "path": "/app/", "upstream": "web", "strip_prefix": "/app"},
                {"name": "site", "path": "/", "upstream": "pool"},
            ],
        }
    )
    proxy = portico(config, workers=2)
    client = AdminClient(config)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = browser.new_page()
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(client.base + "/")
            expect(page.locator("#live.on")).to_be_visible(timeout=SHOW_MS)
            row_a = page.locator(f'tr[data-endpoint="pool/{a.label}"]')
            expect(row_a.locator(".state")).to_have_text("up", timeout=SHOW_MS)
            expect(page.locator('h3[data-app="web"] .actual')).to_have_text("1", timeout=SHOW_MS)

            # Numbers move under a bounded load.
            before = int(row_a.locator(".requests").inner_text())
            stop = threading.Event()
            loader = threading.Thread(target=load, args=(proxy.port, stop))
            loader.start()
            try:
                page.wait_for_function(
                    f"""() => {{
                        const row = document.querySelector('tr[data-endpoint="pool/{a.label}"]');
                        const rps = document.querySelector('tr[data-route="site"] .rps');
                        return row && Number(row.querySelector('.requests').textContent) > {before}
                            && rps && Number(rps.textContent) > 0;
                    }}""",
                    timeout=SHOW_MS,
                )
            finally:
                stop.set()
                loader.join(60)

            # Drain, confirmed in the dialog: the page shows it, traffic avoids it.
            page.fill("#token", TOKEN)
            page.click("#token-form button")
            expect(page.locator("#live.on")).to_be_visible(timeout=SHOW_MS)
            row_a.locator('button[data-act="drain"]').click()
            expect(page.locator("#confirm-text")).to_contain_text(f"Drain {a.label}")
            page.click("#confirm-ok")
            expect(row_a.locator(".state")).to_have_text("draining", timeout=SHOW_MS)
            assert client.endpoint("pool", a.label)["draining"] is True
            assert spread(proxy.port, 10) == {"b": 10}

            # Scale to two: a second instance starts and the page lists it ready.
            page.locator('h3[data-app="web"] button[data-act="scale"]').click()
            page.fill("#confirm-input", "2")
            page.click("#confirm-ok")
            expect(page.locator('h3[data-app="web"] .actual')).to_have_text("2", timeout=SHOW_MS)
            expect(page.locator("tr[data-instance] .state-ready")).to_have_count(2, timeout=SHOW_MS)
            assert len(client.json("/api/apps/web")["instances"]) == 2
            expect(page.locator("#timeline")).to_contain_text("admin: scale web 1 -> 2")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # Weight: the dialog asks for the number; the page shows the new weight.
            row_b = page.locator(f'tr[data-endpoint="pool/{b.label}"]')
            row_b.locator('button[data-act="weight"]').click()
            page.fill("#confirm-input", "7")
            page.click("#confirm-ok")
            expect(row_b.locator(".weight")).to_have_text("7", timeout=SHOW_MS)
            assert client.endpoint("pool", b.label)["weight"] == 7
            # Cancel changes nothing; Undrain brings a back.
            row_a.locator('button[data-act="undrain"]').click()
            page.click("#confirm-cancel")
            assert client.endpoint("pool", a.label)["draining"] is True
            row_a.locator('button[data-act="undrain"]').click()
            page.click("#confirm-ok")
            expect(row_a.locator(".state")).to_have_text("up", timeout=SHOW_MS)
            # Restart: every instance replaced, the timeline says so.
            before = set(page.locator("tr[data-instance]").evaluate_all(
                "rows => rows.map(r => r.dataset.instance)"
            ))  # fmt: skip
            page.locator('h3[data-app="web"] button[data-act="restart"]').click()
            page.click("#confirm-ok")
            expect(page.locator("#timeline")).to_contain_text(
                "web rolling restart done", timeout=SHOW_MS * 2
            )
            after = set(page.locator("tr[data-instance]").evaluate_all(
                "rows => rows.map(r => r.dataset.instance)"
            ))  # fmt: skip
            assert after and not after & before, (before, after)
        finally:
            browser.close()
    assert errors == []
