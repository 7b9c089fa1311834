"""``PorticoProcess``: the real ``python -m portico serve`` in a subprocess, owned by a fixture.

The config is a dict (written out as TOML) or raw TOML text. A dict without
``server.listen`` gets a free 127.0.0.1 port. Either way the file is read back with tomllib
to find the listen addresses to wait on, so the writer is checked on every use.
"""

from __future__ import annotations

import copy
import functools
import shutil
import signal
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from tests.support.lifecycle import StartStop
from tests.support.ports import free_port
from tests.support.processes import ManagedProcess
from tests.support.tomlwriter import dumps
from tests.support.waiting import port_accepts, wait_until

# Seconds a stop allows beyond server.shutdown_grace before SIGKILL; the schema's default grace
# is used when the config does not set one.
STOP_MARGIN = 5.0
DEFAULT_SHUTDOWN_GRACE = 30.0


def listen_address(text: str) -> tuple[str, int]:
    """(host to connect to, port) for a listen address such as ``127.0.0.1:8080``."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


# Every PorticoProcess between start() and stop(): conftest prints their output when a test
# fails, whoever owns them (a factory, a module-scoped fixture).
RUNNING: list[PorticoProcess] = []


class PorticoProcess(StartStop):
    """A portico server started from a config, stopped by SIGTERM (then SIGKILL)."""

    def __init__(
        self,
        config: Mapping[str, Any] | str,
        *,
        workers: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(config, str):
            self.config_text = config
        else:
            data = copy.deepcopy(dict(config))
            server = data.setdefault("server", {})
            server.setdefault("listen", [f"127.0.0.1:{free_port()}"])
            self.config_text = dumps(data)
        self.config: dict[str, Any] = tomllib.loads(self.config_text)
        server = self.config.get("server", {})
        listen = server.get("listen", ["127.0.0.1:8080"])
        listen = [listen] if isinstance(listen, str) else listen
        self.addresses = [listen_address(a) for a in listen]
        self.shutdown_grace = float(server.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE))
        self._dir = tempfile.mkdtemp(prefix="portico-test-")
        self.config_path = Path(self._dir) / "portico.toml"
        self.config_path.write_text(self.config_text)
        argv = [sys.executable, "-m", "portico", "serve", "-c", str(self.config_path)]
        if workers is not None:
            argv += ["-w", str(workers)]
        self.process = ManagedProcess([*argv, *extra_args], env=env, name="portico")

    def __repr__(self) -> str:
        return f"<PorticoProcess {self.url} {self.process!r}>"

    @property
    def port(self) -> int:
        """The first listen address's port."""
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        host, port = self.addresses[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self, include_children: bool = True) -> int:
        return self.process.rss(include_children)

    def output(self) -> str:
        return self.process.output()

    def start(self, timeout: float = 15.0) -> Self:
        """Start and wait until every listen address accepts connections.

        Fails at once, with the captured output, if the process exits first.
        """
        self.process.start()
        RUNNING.append(self)
        try:
            for host, port in self.addresses:
                wait_until(
                    functools.partial(self._accepting, host, port),
                    timeout,
                    interval=0.05,
                    message=f"portico to listen on {host}:{port}",
                )
        except AssertionError as e:
            self.stop(timeout=STOP_MARGIN)
            raise AssertionError(
                f"{e}\n--- config ---\n{self.config_text}--- portico output ---\n{self.output()}"
            ) from None
        return self

    def _accepting(self, host: str, port: int) -> bool:
        if not self.process.alive():
            raise AssertionError(f"portico exited with code {self.process.returncode}")
        return port_accepts(port, host)

    def stop(self, sig: int = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Signal portico (SIGTERM: graceful), wait up to shutdown_grace plus a margin, then
        SIGKILL its process group. Returns the exit code."""
        if timeout is None:
            timeout = self.shutdown_grace + STOP_MARGIN
        code = self.process.stop(sig, timeout)
        if self in RUNNING:
            RUNNING.remove(self)
        shutil.rmtree(self._dir, ignore_errors=True)
        return code
