"""A private Docker Engine for the container tests, and the test image it runs.

``DockerDaemon`` starts ``dockerd`` with its own data root, exec root and socket under a
short directory in /tmp (a unix socket path must fit in 108 bytes), with ``--iptables=false
--ip6tables=false --bridge=none``: it changes nothing on the machine's network, and the
containers use host networking on 127.0.0.1. Stopping it removes every container, stops the
engine (and the containerd it started), unmounts what it left mounted and deletes its
directory.

The image ``portico-test:busybox`` is imported from a root filesystem holding only the
statically linked busybox of Debian's ``busybox-static``: no registry is needed.

* ``/bin/serve PORT`` runs ``busybox httpd`` on 127.0.0.1:PORT over /www and, on SIGTERM,
  waits ``$STOP_DELAY`` seconds (finishing what it serves, as a graceful app would) before
  it stops (busybox httpd as PID 1 would ignore SIGTERM, leaving Docker to SIGKILL it);
* ``/`` answers ``ok``; ``/cgi-bin/whoami`` answers ``$PORTICO_INSTANCE`` or the container's
  host name; ``/cgi-bin/slow?S`` answers after S seconds (for in-flight load);
* ``/bin/spin`` burns CPU (for the stats test).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import struct
import subprocess
import tarfile
import tempfile
from typing import Any

import psutil

from tests.support.processes import ManagedProcess
from tests.support.waiting import wait_until

IMAGE = "portico-test:busybox"
BUSYBOX = "/bin/busybox"
# Seconds for a fresh engine to answer its socket; it usually takes 1-3.
START_TIMEOUT = 30.0

SERVE = """#!/bin/sh
# serve PORT: busybox httpd on 127.0.0.1:PORT; a graceful stop on SIGTERM
trap 'sleep "${STOP_DELAY:-0}"; kill "$pid"; exit 0' TERM INT
httpd -f -p "127.0.0.1:${1:-$PORT}" -h /www &
pid=$!
wait "$pid"
"""
WHOAMI = """#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' "${PORTICO_INSTANCE:-$(hostname)}"
"""
SLOW = """#!/bin/sh
sleep "${QUERY_STRING:-1}"
printf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' "${PORTICO_INSTANCE:-$(hostname)}"
"""
SPIN = """#!/bin/sh
trap 'exit 0' TERM
while :; do :; done
"""
APPLETS = (
    "sh", "httpd", "sleep", "kill", "hostname", "printf", "cat", "echo", "true", "test", "touch",
    "rm",
)  # fmt: skip


class EngineUnavailable(Exception):
    """dockerd cannot run here; the message says why (the tests are then skipped)."""


def is_static_elf(path: str) -> bool:
    """True if ``path`` is an ELF executable without a program interpreter (static)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only: what Debian ships here
            return False
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = [struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum)]
    return 3 not in types  # PT_INTERP


def why_not() -> str | None:
    """Why a private dockerd cannot be started here, or None if it may."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    if shutil.which("dockerd") is None:
        return "dockerd is not installed (apt-get install docker.io)"
    if not os.path.exists(BUSYBOX) or not is_static_elf(BUSYBOX):
        return f"no static {BUSYBOX} for the test image (apt-get install busybox-static)"
    if not os.path.isdir("/sys/fs/cgroup") or not os.listdir("/sys/fs/cgroup"):
        return "no cgroup file system mounted"
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker SDK is not installed (pip install 'portico[docker]')"
    return None


def rootfs_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)

        def add_file(name: str, text: str, mode: int = 0o644) -> None:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "www", "www/cgi-bin", "etc"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        add_file("bin/serve", SERVE, 0o755)
        add_file("bin/spin", SPIN, 0o755)
        add_file("www/index.html", "ok\n")
        add_file("www/cgi-bin/whoami", WHOAMI, 0o755)
        add_file("www/cgi-bin/slow", SLOW, 0o755)
    return buf.getvalue()


class DockerDaemon:
    """A dockerd of our own, its client, and the test image."""

    def __init__(self) -> None:
        # Short: the socket path must stay well under the 108-byte unix socket limit.
        self.dir = tempfile.mkdtemp(prefix="pd", dir="/tmp")
        self.socket = os.path.join(self.dir, "docker.sock")
        self.url = f"unix://{self.socket}"
        self.process: ManagedProcess | None = None
        self.client: Any = None

    def __repr__(self) -> str:
        return f"<DockerDaemon {self.url}>"

    def start(self) -> DockerDaemon:
        reason = why_not()
        if reason is not None:
            raise EngineUnavailable(reason)
        import docker

        d = self.dir
        argv = [
            "dockerd",
            f"--data-root={d}/root",
            f"--exec-root={d}/exec",
            f"--pidfile={d}/d.pid",
            f"--host=unix://{self.socket}",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
        ]
        self.process = ManagedProcess(argv, name="dockerd").start()

        def answers() -> bool:
            if not self.process or not self.process.alive():
                raise EngineUnavailable(f"dockerd exited:\n{self.log_tail()}")
            try:
                # The client asks the engine its API version as it is made: made here.
                self.client = docker.DockerClient(base_url=self.url, timeout=30)
                return bool(self.client.ping())
            except docker.errors.DockerException:
                return False

        try:
            wait_until(answers, timeout=START_TIMEOUT, interval=0.1, message="dockerd")
            self.client.api.import_image_from_data(
                rootfs_tar(), repository=IMAGE.split(":")[0], tag=IMAGE.split(":")[1]
            )
        except AssertionError:
            raise EngineUnavailable(f"dockerd did not answer:\n{self.log_tail()}") from None
        except docker.errors.DockerException as exc:
            raise EngineUnavailable(f"cannot import the test image: {exc}") from None
        return self

    def log_tail(self, lines: int = 15) -> str:
        text = self.process.output() if self.process else ""
        return "\n".join(text.splitlines()[-lines:])

    # --- what tests use -------------------------------------------------------------------

    def containers(self, labels: dict[str, str], all: bool = False) -> list[dict[str, Any]]:
        """Containers carrying every label (running ones unless ``all``), as the engine lists
        them (``Id``, ``Labels``, ``State``, ...). One call: the SDK's ``containers.list``
        inspects each container afterwards, which fails on one removed in between."""
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        return list(self.client.api.containers(all=all, filters=filters))

    def run(
        self,
        command: list[str],
        labels: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> Any:
        """A started container of the test image on the host's network."""
        return self.client.containers.run(
            IMAGE,
            command,
            detach=True,
            network_mode="host",
            labels=labels or {},
            environment=env or {},
            name=name,
        )

    def remove_all(self) -> None:
        if self.client is None:
            return
        for container in self.client.containers.list(all=True):
            with contextlib.suppress(Exception):
                container.remove(force=True)

    # --- teardown -------------------------------------------------------------------------

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.remove_all()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        if self.process is not None:
            self.process.stop(signal.SIGTERM, timeout=20)
        self._kill_leftovers()
        self._unmount()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """containerd and its shims run in process groups of their own; a clean dockerd stop
        ends them, and this ends any that a failed stop left, found by our directory."""
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if self.dir in cmdline and proc.pid != os.getpid():
                with contextlib.suppress(psutil.Error):
                    proc.kill()

    def _unmount(self) -> None:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f if self.dir in line.split()[1]]
        for point in sorted(points, key=len, reverse=True):  # deepest first
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
