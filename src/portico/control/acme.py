"""Automatic certificates: obtained and renewed once per gateway (in the master with
workers), installed in every serving process.

Theory of operation. ``prepare`` runs before any listener is built: each automatic
certificate has its files in the state dir (``config.tls.auto_files``); when they are
missing, expired or unreadable, a short-lived self-signed placeholder is written, so the TLS
listener can start (and answer TLS-ALPN-01 challenges) before the first issuance. ``start``
runs one task per certificate: it sleeps until ``policy.renewal.next_attempt`` says, asks
the issuer (ACME or internal CA, ``control.issuers``, in a thread: both block), writes the
key and chain atomically, and tells every serving process to load them (``publish``: the bus
with workers, the process's own listeners without). A failure is logged, kept in the status
and retried with back-off; the running certificate stays. Challenge answers travel the same
way, and the issuer waits ``CHALLENGE_SETTLE`` after publishing so that every worker holds
the answer before the CA asks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from portico.config.model import Config
from portico.config.tls import AutoCerts, auto_files
from portico.control.issuers import (
    InternalIssuer,
    IssueError,
    issuer_for,
    new_key_pem,
    self_signed,
    write_private,
)
from portico.policy.certificates import inspect
from portico.policy.renewal import Validity, next_attempt

log = logging.getLogger("portico.acme")

# Seconds the issuer waits after publishing a challenge answer: bus messages reach workers
# in milliseconds; this covers a worker busy with a burst.
CHALLENGE_SETTLE = 0.5
# The placeholder served until the first certificate arrives.
PLACEHOLDER_LIFETIME = dt.timedelta(days=1)

# A message for every serving process: ("acme", kind, what, value) with kind "http-01"
# (token, key authorization | None), "tls-alpn-01" (name, (cert, key) PEMs | None) or
# "reload" (the listener key, None).
Message = tuple[str, str, str, Any]


@dataclass(slots=True)
class CertStatus:
    """What the admin API shows of one automatic certificate."""

    names: list[str]
    issuer: str
    state: str = "pending"  # pending | valid | failing
    not_after: str | None = None
    next_attempt: str | None = None
    last_success: str | None = None
    last_error: str | None = None
    failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def _validity(auto: AutoCerts) -> tuple[Validity | None, bool]:
    """(validity of the certificate on disk, whether it is a real one, not a placeholder)."""
    files = auto_files(auto)
    try:
        with open(files.cert, "rb") as f:
            cert_pem = f.read()
        with open(files.key, "rb") as f:
            key_pem = f.read()
        facts = inspect(cert_pem, key_pem, None, dt.datetime.now(dt.UTC))
    except (OSError, ValueError):
        return None, False
    if facts.errors:
        return None, False
    real = not os.path.exists(files.cert + ".placeholder")
    return Validity(facts.not_before.timestamp(), facts.not_after.timestamp()), real


def automatic(config: Config) -> list[tuple[str, AutoCerts]]:
    return [(f"tls[{i}]", t.auto) for i, t in enumerate(config.tls) if t.auto is not None]


def prepare(config: Config) -> None:
    """Make sure every automatic certificate has files a listener can load."""
    for key, auto in automatic(config):
        if isinstance(issuer := issuer_for(auto), InternalIssuer) and issuer.ensure_ca():
            log.info("%s", issuer.trust_hint())
        validity, _ = _validity(auto)
        if validity is not None and time.time() < validity.not_after:
            continue
        files = auto_files(auto)
        key_pem = new_key_pem()
        write_private(files.key, key_pem)
        write_private(files.cert, self_signed(auto.names, key_pem, PLACEHOLDER_LIFETIME))
        with open(files.cert + ".placeholder", "w") as f:
            f.write("served until the first certificate is issued\n")
        log.info("%s.auto: placeholder certificate until the first issuance", key)


class CertManager:
    """Runs the issuance and renewal of every automatic certificate of a config."""

    def __init__(
        self, config: Config, publish: Callable[[Message], None], wait_listening: float = 30.0
    ) -> None:
        self.publish = publish
        self.wait_listening = wait_listening
        self.listen = [*config.server.listen, *(a for t in config.tls for a in t.listen)]
        self.certs = automatic(config)
        self.statuses = {
            key: CertStatus(list(auto.names), auto.issuer) for key, auto in self.certs
        }
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def status(self) -> dict[str, dict[str, Any]]:
        """Every automatic certificate's status, by listener key (for the admin API)."""
        return {key: s.as_dict() for key, s in self.statuses.items()}

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for key, auto in self.certs:
            self._tasks.append(self._loop.create_task(self._run(key, auto)))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    async def _listening(self) -> None:
        """Until the listeners accept (the workers bind after the master starts)."""
        from portico.config.types import parse_hostport

        deadline = time.monotonic() + self.wait_listening
        for address in self.listen:
            host, port = parse_hostport(address)
            host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
            while time.monotonic() < deadline:
                try:
                    _, writer = await asyncio.open_connection(host, port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                break

    async def _run(self, key: str, auto: AutoCerts) -> None:
        status = self.statuses[key]
        draw = random.random()
        await self._listening()
        while True:
            validity, real = _validity(auto)
            if validity is not None and real:
                status.not_after = _iso(validity.not_after)
                if status.failures == 0:
                    status.state = "valid"
            now = time.time()
            at = next_attempt(
                validity if real else None, now, auto.renew_at, draw,
                status.failures, auto.retry_min, auto.retry_max,
            )
            status.next_attempt = _iso(at)
            if at > now:
                await asyncio.sleep(at - now)
            await self._attempt(key, auto, status)
            draw = random.random()

    async def _attempt(self, key: str, auto: AutoCerts, status: CertStatus) -> None:
        issuer = issuer_for(auto)
        key_pem = new_key_pem()
        log.info("%s.auto: requesting a certificate for %s (%s)", key, ", ".join(auto.names),
                 auto.issuer)
        try:
            chain = await asyncio.to_thread(issuer.issue, key_pem, self._publisher())
        except IssueError as exc:
            status.failures += 1
            status.state = "failing"
            status.last_error = str(exc)
            log.error("%s.auto: certificate for %s failed (attempt %d): %s", key,
                      ", ".join(auto.names), status.failures, exc)
            return
        except Exception as exc:  # a bug or an unexpected library error: keep serving
            status.failures += 1
            status.state = "failing"
            status.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("%s.auto: certificate request failed", key)
            return
        files = auto_files(auto)
        write_private(files.key + ".new", key_pem)
        write_private(files.cert + ".new", chain)
        # Key first, then the chain: a process that reloads in between sees a mismatch,
        # refuses it and keeps the old pair until the chain lands (dataplane.tls).
        os.replace(files.key + ".new", files.key)
        os.replace(files.cert + ".new", files.cert)
        if os.path.exists(files.cert + ".placeholder"):
            os.unlink(files.cert + ".placeholder")
        validity, _ = _validity(auto)
        status.failures = 0
        status.state = "valid"
        status.last_error = None
        status.last_success = _iso(time.time())
        if validity is not None:
            status.not_after = _iso(validity.not_after)
        log.info("%s.auto: certificate for %s issued, valid until %s", key,
                 ", ".join(auto.names), status.not_after)
        self.publish(("acme", "reload", key, None))

    def _publisher(self) -> Callable[[str, str, Any], None]:
        """The issuer's ``publish``, called from its thread: hands the message to the loop
        and waits until it is sent, then lets the workers settle."""
        loop = self._loop
        assert loop is not None

        def publish(kind: str, what: str, value: Any) -> None:
            done = asyncio.run_coroutine_threadsafe(self._send(("acme", kind, what, value)), loop)
            done.result(timeout=10)
            if value is not None:
                time.sleep(CHALLENGE_SETTLE)

        return publish

    async def _send(self, message: Message) -> None:
        self.publish(message)
