"""One access-log line per request, in common, combined or JSON format.

Off by default; when off, the proxy holds ``None`` instead of a logger, so the cost is one
``is not None`` test per request. Lines go to a 64 KiB buffer flushed once a second (and on
shutdown) rather than one write system call per request.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import BinaryIO

from portico.runtime.request import RequestState

# Big enough to batch a second of traffic at moderate rates, small enough to lose little
# if the process is killed.
BUFFER_BYTES = 65536


def _clf_time(now: float) -> str:
    return time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))


class AccessLog:
    __slots__ = ("_fmt", "_out", "_owned")

    def __init__(self, fmt: str, path: str) -> None:
        self._fmt = fmt
        if path == "-":
            self._out: BinaryIO = sys.stdout.buffer
            self._owned = False
        else:
            self._out = open(path, "ab", buffering=BUFFER_BYTES)  # noqa: SIM115 - lives with us
            self._owned = True

    def log_request(self, client: str, req: RequestState, duration: float) -> None:
        """One line for a finished request; Referer and User-Agent come from its head."""
        head = req.head
        referer = user_agent = None
        for name, value in head.headers:
            lname = name.lower()
            if lname == b"referer":
                referer = value
            elif lname == b"user-agent":
                user_agent = value
        now = time.time()
        method, target = head.method.decode("latin-1"), head.target.decode("latin-1")
        request = f"{method} {target} HTTP/{head.version.decode()}"
        request_id = req.request_id
        if self._fmt == "json":
            route = req.route
            up_time = req.upstream_time
            line = json.dumps(
                {
                    "time": now,
                    "client": client,
                    "request": request,
                    "method": method,
                    "target": target,
                    "status": req.status,
                    "bytes": req.sent_bytes,
                    "bytes_received": req.received_bytes,
                    "referer": referer.decode("latin-1") if referer else None,
                    "user_agent": user_agent.decode("latin-1") if user_agent else None,
                    "duration_ms": round(duration * 1000, 3),
                    "request_id": request_id.decode("latin-1") if request_id else None,
                    "route": route.name if route is not None else None,
                    "upstream": req.service,
                    "endpoint": req.upstream,
                    "tries": req.tries,
                    # From sending the request upstream to the response head (last try).
                    "upstream_header_ms": round(up_time * 1000, 3) if up_time is not None else None,
                    "refused": req.refused,
                }
            )
        else:
            # The common and combined formats stay exactly what log tools parse; the
            # request ID, when on, is the one field added (in quotes, at the end).
            line = f'{client} - - [{_clf_time(now)}] "{request}" {req.status} {req.sent_bytes}'
            if self._fmt == "combined":
                ref = referer.decode("latin-1") if referer else "-"
                ua = user_agent.decode("latin-1") if user_agent else "-"
                line += f' "{ref}" "{ua}"'
            if request_id is not None:
                line += f' "{request_id.decode("latin-1")}"'
        self._out.write(line.encode("utf-8", "replace") + b"\n")

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._out.close()
