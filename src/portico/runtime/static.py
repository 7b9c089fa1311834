"""A ``static`` route as the data plane uses it: the config flattened once per load."""

from __future__ import annotations

import os

from portico.config.routes import Static


class StaticSpec:
    __slots__ = (
        "alias_prefix",
        "cache_rules",
        "charset",
        "codings",
        "directory",
        "fallback",
        "fallback_upstream",
        "hidden",
        "index",
        "listing",
        "real_directory",
        "symlinks_outside",
        "types",
    )

    def __init__(self, cfg: Static, route_path: str | None) -> None:
        self.directory = cfg.directory().rstrip("/") or "/"
        # Symlinks are judged against the directory's real path, so a root that is itself
        # reached through a symlink still works.
        self.real_directory = os.path.realpath(self.directory)
        # alias: the route's path prefix is replaced by the directory (nginx ``alias``).
        self.alias_prefix = (
            route_path.encode() if cfg.alias is not None and route_path is not None else None
        )
        self.index = tuple(cfg.index)
        self.fallback = cfg.fallback
        self.fallback_upstream = cfg.fallback_upstream
        self.listing = cfg.listing
        self.hidden = cfg.hidden
        self.symlinks_outside = cfg.symlinks_outside
        self.codings = tuple(cfg.codings())
        self.cache_rules = tuple((k, v.encode("latin-1")) for k, v in cfg.cache_control.items())
        self.charset = cfg.charset
        self.types = {k.lower(): v for k, v in cfg.types.items()}

    def url_path(self, path: bytes) -> bytes:
        """The part of the request path looked up under the directory."""
        prefix = self.alias_prefix
        if prefix is not None and path.startswith(prefix):
            rest = path[len(prefix) :]
            return rest if rest.startswith(b"/") else b"/" + rest
        return path
