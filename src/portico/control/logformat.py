"""How Portico's own log lines look: text for a terminal, or one JSON object per line for a
log pipeline (``portico --log-format json serve``).

Workers are spawned processes that configure logging afresh; they learn the format from the
``PORTICO_LOG_FORMAT`` environment variable, which the CLI sets and children inherit (the
variable may also be set directly). Access-log lines are separate: see ``[access_log]``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

ENV = "PORTICO_LOG_FORMAT"
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is kept.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (RFC 3339, UTC), level, logger, pid, message, and
    the ``extra`` fields and exception text when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "time": f"{created}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = (
                    value if isinstance(value, str | int | float | bool | None) else repr(value)
                )
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(fmt: str | None = None) -> None:
    """Set up the root logger at INFO in ``fmt`` (default: ``$PORTICO_LOG_FORMAT``, else
    text), and export the choice so spawned workers log alike."""
    fmt = fmt or os.environ.get(ENV) or "text"
    if fmt not in FORMATS:
        fmt = "text"
    os.environ[ENV] = fmt
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
