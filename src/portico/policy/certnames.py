"""Which certificate serves a TLS server name (SNI): exact names first, then a wildcard
covering exactly one label (``*.example.com`` covers ``a.example.com``, not
``example.com`` nor ``a.b.example.com``, as RFC 6125 6.4.3 says), else the default.

Names come from the certificates (subjectAltName, else CN); ``NameTable`` is built once per
certificate set and answers in one or two dict lookups per handshake.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


def normalize(name: str) -> str:
    """Server names compare case-insensitively and without a trailing dot."""
    return name.rstrip(".").lower()


class NameTable(Generic[T]):
    """Server name -> item. The first item to claim a name keeps it."""

    __slots__ = ("default", "exact", "wildcard")

    def __init__(self, entries: Iterable[tuple[Sequence[str], T]], default: T) -> None:
        self.exact: dict[str, T] = {}
        self.wildcard: dict[str, T] = {}  # "example.com" for "*.example.com"
        self.default = default
        for names, item in entries:
            for raw in names:
                name = normalize(raw)
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], item)
                else:
                    self.exact.setdefault(name, item)

    def lookup(self, server_name: str | None) -> T | None:
        """The item for ``server_name``, or None when no certificate names it."""
        if not server_name:
            return None
        name = normalize(server_name)
        item = self.exact.get(name)
        if item is not None:
            return item
        dot = name.find(".")
        if dot > 0:
            return self.wildcard.get(name[dot + 1 :])
        return None

    def select(self, server_name: str | None) -> T:
        """The item for ``server_name``, the default when none names it."""
        item = self.lookup(server_name)
        return self.default if item is None else item

    def covers(self, name: str) -> bool:
        return self.lookup(name) is not None
