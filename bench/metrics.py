"""The metrics case: the small body through Portico without metrics (no ``[admin]`` section)
and with them (``[admin]`` configured, ``/metrics`` scraped once a second while it runs).

Issue 12's goal: metrics on within 5% of metrics off, measured in the same run. The two
processes are loaded at the same time and share core 0 (as the route tables do), so whatever
else the machine runs slows both alike; rounds give medians, and CPU time per request is the
figure that holds on a loaded machine. Scraping every second is harsher than Prometheus's
usual 15 s, and with one worker the scrape is served by the same process that proxies.
"""

from __future__ import annotations

import threading
import urllib.request

import nginx
from routes import RouteCase

TOKEN = "bench-admin-token"
SCRAPE_EVERY_S = 1.0
OFF, ON, ADMIN_ONLY, CONTROL = (
    "portico-metrics-off",
    "portico-metrics-on",
    "portico-admin-only",
    "portico-metrics-off-2",
)
_ROUTE = '[[routes]]\npath = "/"\nupstream = "bench"\n'


def cases(admin_ports: tuple[int, int]) -> list[RouteCase]:
    """Metrics off first: the others are compared with it. Then metrics on; the admin
    listener with ``metrics = false`` (the listener's cost apart from the counting's); and
    a second metrics-off process, an A/A control: its ratio to the first is the noise floor
    (and any bias from the order the processes start or are loaded in)."""

    def admin(port: int, extra: str = "") -> str:
        return f'\n[admin]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n{extra}'

    return [
        RouteCase(OFF, "metrics off (no [admin])", _ROUTE, nginx.SMALL_PATH, None),
        RouteCase(ON, "metrics on ([admin], scraped every 1 s)", _ROUTE + admin(admin_ports[1]),
                  nginx.SMALL_PATH, None),
        RouteCase(ADMIN_ONLY, "[admin] with metrics = false", _ROUTE + admin(admin_ports[0],
                  "metrics = false\n"), nginx.SMALL_PATH, None),
        RouteCase(CONTROL, "metrics off again (A/A control)", _ROUTE, nginx.SMALL_PATH, None),
    ]  # fmt: skip


class Scraper:
    """Scrapes a /metrics URL every ``SCRAPE_EVERY_S`` in a thread until stopped; each
    scrape must answer 200 and name portico_requests_total, or the run is reported broken."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.scrapes = 0
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_EVERY_S):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    body = resp.read()
                if resp.status != 200 or b"portico_requests_total" not in body:
                    self.problem = f"scrape of {self.url}: {resp.status}, {len(body)} bytes"
                self.scrapes += 1
            except OSError as exc:
                self.problem = f"scrape of {self.url}: {exc}"

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
