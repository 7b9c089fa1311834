"""A bounded load generator for the demo: N concurrent clients for S seconds, then stop.

    python examples/load.py --url http://127.0.0.1:8080/sleep/0.2 --clients 16 --seconds 30

Each client keeps one connection and sends requests back to back; the script prints the
requests done and the instances that answered. Watch `portico run`'s log scale up while it
runs and back down after.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import threading
import time
from urllib.parse import urlsplit


def client(url: str, deadline: float, seen: collections.Counter[str], lock: threading.Lock) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=10)
    path = parts.path or "/"
    while time.monotonic() < deadline:
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            who = resp.getheader("X-Instance") or str(resp.status)
            if resp.status == 200 and body.startswith(b"{"):
                who = json.loads(body).get("instance", who)
        except (OSError, http.client.HTTPException):
            conn.close()
            who = "error"
            time.sleep(0.1)
        with lock:
            seen[who] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080/sleep/0.2")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    seen: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + min(args.seconds, 600.0)
    threads = [
        threading.Thread(target=client, args=(args.url, deadline, seen, lock), daemon=True)
        for _ in range(max(1, min(args.clients, 512)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{sum(seen.values())} requests in {args.seconds:g}s")
    for who, n in seen.most_common():
        print(f"  {who}: {n}")


if __name__ == "__main__":
    main()
