"""Typed events the HTTP/1.1 codec emits. Bytes go into a parser; these come out.

Header names and values stay ``bytes`` as they arrived (original case) so the proxy can pass
them through byte for byte; the parser also records the few facts the proxy needs about them
(framing, keep-alive, Connection tokens) so nobody has to scan the headers twice.
"""

from __future__ import annotations

from typing import Literal

Headers = list[tuple[bytes, bytes]]

# How a body is delimited on the wire.
#   none: no body at all; length: Content-Length; chunked: chunked coding;
#   close: the body runs until the sender closes (responses only).
Framing = Literal["none", "length", "chunked", "close"]


class RequestHead:
    """A complete, validated request head."""

    __slots__ = (
        "connection_tokens",
        "content_length",
        "expect_continue",
        "framing",
        "headers",
        "host",
        "keep_alive",
        "method",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Headers,
        *,
        host: bytes | None,
        keep_alive: bool,
        framing: Framing,
        content_length: int | None,
        connection_tokens: frozenset[bytes],
        expect_continue: bool,
        upgrade: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host = host
        self.keep_alive = keep_alive
        self.framing: Framing = framing
        self.content_length = content_length
        self.connection_tokens = connection_tokens
        self.expect_continue = expect_continue
        self.upgrade = upgrade

    def __repr__(self) -> str:
        return (
            f"<RequestHead {self.method.decode()} {self.target.decode('latin-1')} "
            f"HTTP/{self.version.decode()} framing={self.framing}>"
        )


class ResponseHead:
    """A complete, validated response head (final or informational 1xx)."""

    __slots__ = (
        "connection_tokens",
        "content_length",
        "framing",
        "headers",
        "keep_alive",
        "reason",
        "status",
        "version",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        headers: Headers,
        *,
        keep_alive: bool,
        framing: Framing,
        content_length: int | None,
        connection_tokens: frozenset[bytes],
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.framing: Framing = framing
        self.content_length = content_length
        self.connection_tokens = connection_tokens

    @property
    def informational(self) -> bool:
        return self.status < 200

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status} framing={self.framing}>"


class Data:
    """A piece of message body, already de-chunked."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"<Data {len(self.data)} bytes>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Data) and other.data == self.data


class EndOfMessage:
    """The message (head and body) is complete."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<EndOfMessage>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EndOfMessage)


END_OF_MESSAGE = EndOfMessage()

Event = RequestHead | ResponseHead | Data | EndOfMessage
