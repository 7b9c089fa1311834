"""The one exception family. Every error knows the status the client should get.

``portico.dataplane.responses.error_response`` is the single place that turns one of these
into bytes on the wire; nothing else writes error responses.
"""

from __future__ import annotations


class PorticoError(Exception):
    """Base of every error Portico raises on purpose."""

    status: int = 500


class ConfigError(PorticoError):
    """A configuration file or flag set was refused. ``problems`` holds ``(path, reason)``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {r}" for p, r in problems) or "invalid configuration")


class StartupError(PorticoError):
    """Portico could not start (a busy port, a pid file in use, an unwritable path); the
    message names what and where, for one line on the terminal."""


# --- client side: the request itself is at fault -------------------------------------------


class ProtocolError(PorticoError):
    """The client sent something that is not valid HTTP/1.1 (or exceeds a limit).

    The connection is always closed after answering, because framing can no longer be trusted.
    """

    status = 400

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


# --- upstream side ---------------------------------------------------------------------------


class UpstreamError(PorticoError):
    """Something went wrong talking to a backend.

    ``request_sent`` is False when no byte of the request can have reached the backend, so a
    retry is always safe; when True, only idempotent requests may be replayed.
    """

    status = 502

    def __init__(self, reason: str, *, request_sent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request_sent = request_sent


class ConnectFailed(UpstreamError):
    """Refused, unreachable or reset while connecting: 502."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, request_sent=False)


class ConnectTimeout(UpstreamError):
    """The TCP connect did not finish in time: 504."""

    status = 504

    def __init__(self, reason: str = "upstream connect timed out") -> None:
        super().__init__(reason, request_sent=False)


class ResponseTimeout(UpstreamError):
    """No complete response head (or body progress) in time: 504."""

    status = 504


class UpstreamClosed(UpstreamError):
    """The backend closed or reset the connection before a complete response head: 502."""


class BadResponse(UpstreamError):
    """The backend sent something that is not a valid HTTP/1.1 response: 502."""


class NoHealthyEndpoint(PorticoError):
    """No endpoint is configured or available for the route: 503. ``detail``: a short reason
    the client is told (an app crash-looping), or None."""

    status = 503

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.detail = detail


class NoRoute(PorticoError):
    """No route matches the request: 404."""

    status = 404
