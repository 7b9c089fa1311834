"""The HTTPS listeners of one process: binding them, reloading their certificates on a
config reload (SIGHUP) or when the files change on disk, and closing them.

Each process (the only one, or each worker) watches the files itself: a ``stat`` of a few
files every ``reload_check`` seconds costs nothing, and needs no message from the master.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from portico.config.model import Config
from portico.dataplane.context import ProxyContext
from portico.dataplane.listener import bind_socket
from portico.dataplane.tls import CertStore, connection_factory
from portico.runtime.tlsstages import HTTP01

log = logging.getLogger("portico.tls")

# Seconds between looks at the clock for a session-ticket key rotation (policy.tickets).
TICKET_CHECK = 60.0


class TlsListeners:
    __slots__ = ("_timer", "config", "ctx", "loop", "stores")

    def __init__(self, config: Config, ctx: ProxyContext) -> None:
        self.config = config
        self.ctx = ctx
        self.loop = ctx.loop
        # Built before binding: a certificate that cannot load stops the start with its key.
        self.stores = [CertStore(listener, f"tls[{i}]") for i, listener in enumerate(config.tls)]
        self._timer: asyncio.TimerHandle | None = None

    async def bind(self, reuse_port: bool, backlog: int) -> list[asyncio.Server]:
        servers = []
        for store in self.stores:
            listener = store.listener
            for address in listener.listen:
                sock = bind_socket(address, reuse_port=reuse_port, backlog=backlog)
                server = await self.loop.create_server(
                    connection_factory(self.ctx, store),
                    sock=sock,
                    backlog=backlog,
                    ssl=store.base,
                    ssl_handshake_timeout=listener.handshake_timeout,
                )
                servers.append(server)
                host, port = sock.getsockname()[:2]
                log.info("listening on https://%s:%d (pid %d)", host, port, os.getpid())
        self._arm()
        return servers

    def _arm(self) -> None:
        every = [s.listener.reload_check for s in self.stores if s.listener.reload_check > 0]
        self._timer = self.loop.call_later(min([*every, TICKET_CHECK]), self._check)

    def _check(self) -> None:
        now = time.time()
        for store in self.stores:
            if store.listener.reload_check > 0 and store.changed_on_disk():
                store.reload()
            store.rotate_tickets(now)
        self._arm()

    def apply(self, config: Config) -> None:
        """A reloaded config: certificates load again (SIGHUP is how to force it); the listen
        addresses themselves need a restart."""
        old = [listener.listen for listener in self.config.tls]
        new = [listener.listen for listener in config.tls]
        if old != new:
            log.warning("tls listeners changed: takes effect on restart only")
        else:
            for store, listener in zip(self.stores, config.tls, strict=True):
                store.reload(listener)
        self.config = config

    def on_message(self, message: tuple[Any, ...]) -> None:
        """An ``("acme", kind, what, value)`` message from ``control.acme`` (directly, or
        from the master over the bus): challenge answers, and "load the new certificate"."""
        _, kind, what, value = message
        if kind == "http-01":
            if value is None:
                HTTP01.tokens.pop(what.encode("ascii"), None)
            else:
                HTTP01.tokens[what.encode("ascii")] = value.encode("ascii")
        elif kind == "tls-alpn-01":
            for store in self.stores:
                store.set_challenge(what, value)
        elif kind == "reload":
            for store in self.stores:
                if store.key == what:
                    store.reload()

    def stats(self) -> dict[str, dict[str, int]]:
        """Handshake counters per TLS listener, by key (``tls[0]``), for the admin API."""
        return {store.key: store.stats() for store in self.stores}

    def close(self) -> None:
        for store in self.stores:
            s = store.stats()
            log.info(
                "%s: %d connection(s) accepted, %d handshake(s) completed, %d cut"
                " (garbage, stalled, timed out, plain HTTP or refused)",
                store.key, s["accepted"], s["established"], s["not_established"],
            )
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
