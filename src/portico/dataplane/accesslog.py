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

from portico.codec.events import RequestHead

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

    def log(
        self,
        client: str,
        method: bytes,
        target: bytes,
        version: bytes,
        status: int,
        sent: int,
        referer: bytes | None,
        user_agent: bytes | None,
        duration: float,
        upstream: str | None,
        request_id: bytes | None = None,
    ) -> None:
        now = time.time()
        request = f"{method.decode('latin-1')} {target.decode('latin-1')} HTTP/{version.decode()}"
        if self._fmt == "json":
            line = json.dumps(
                {
                    "time": now,
                    "client": client,
                    "request": request,
                    "method": method.decode("latin-1"),
                    "target": target.decode("latin-1"),
                    "status": status,
                    "bytes": sent,
                    "referer": referer.decode("latin-1") if referer else None,
                    "user_agent": user_agent.decode("latin-1") if user_agent else None,
                    "duration_ms": round(duration * 1000, 3),
                    "upstream": upstream,
                    "request_id": request_id.decode("latin-1") if request_id else None,
                }
            )
        else:
            line = f'{client} - - [{_clf_time(now)}] "{request}" {status} {sent}'
            if self._fmt == "combined":
                ref = referer.decode("latin-1") if referer else "-"
                ua = user_agent.decode("latin-1") if user_agent else "-"
                line += f' "{ref}" "{ua}"'
            if request_id is not None:
                line += f' "{request_id.decode("latin-1")}"'
        self._out.write(line.encode("utf-8", "replace") + b"\n")

    def log_request(
        self,
        client: str,
        head: RequestHead,
        status: int,
        sent: int,
        duration: float,
        upstream: str | None,
        request_id: bytes | None = None,
    ) -> None:
        """One line for a proxied request; Referer and User-Agent come from its head."""
        referer = user_agent = None
        for name, value in head.headers:
            lname = name.lower()
            if lname == b"referer":
                referer = value
            elif lname == b"user-agent":
                user_agent = value
        self.log(
            client,
            head.method,
            head.target,
            head.version,
            status,
            sent,
            referer,
            user_agent,
            duration,
            upstream,
            request_id,
        )

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._out.close()
