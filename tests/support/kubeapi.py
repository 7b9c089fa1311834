"""``FakeKubeApi``: a Kubernetes API server for the tests, on a real 127.0.0.1 socket.

No API server can run on these machines, so this speaks the wire format of the parts
Portico uses, from the API reference, with every object built from lightkube's models
(``.to_dict()``), so the shapes are the client library's, not ours:

* lists (``items``, ``metadata.resourceVersion``, ``limit``/``continue`` pages) and
  watches: ``watch=true`` answers a chunked stream of JSON lines ``{"type", "object"}``,
  ADDED/MODIFIED/DELETED from a history kept by resourceVersion, BOOKMARK when asked
  (``allowWatchBookmarks``), and ``410 Gone`` as an ERROR event carrying a Status when the
  requested version was compacted away;
* Deployments with the scale subresource (GET, PATCH merge-patch), strategic/merge PATCH
  of the pod template, POST create; Leases with GET/POST/PUT and 409 Conflict on a stale
  ``metadata.resourceVersion``; metrics.k8s.io PodMetrics when enabled, 404 otherwise;
* a bearer token is required (401 otherwise), and ``forbid()`` refuses a verb on a
  resource with the 403 Status the real authorizer writes.

Faults: ``fail()`` (the next N requests to a path answer 500, or 429 with Retry-After),
``drop_watches()`` (streams cut mid-way, no final chunk), ``expire_watches()`` (410 as an
ERROR event, then the history compacted), ``delay`` (a slow API).

Every request is recorded (``transcript``): method, path, query, body, status, answer.
Lists and watches are in ``tests.support.kubelists``, single-object verbs in
``tests.support.kubeverbs``, the pods behind Deployments in ``tests.support.kubepods``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import urllib.parse
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

from lightkube.models.meta_v1 import ListMeta, Status

from tests.support.lifecycle import StartStop
from tests.support.ports import free_port

T = TypeVar("T")
TOKEN = "portico-test-token"
GROUPS = {
    "endpointslices": ("discovery.k8s.io", "v1"),
    "deployments": ("apps", "v1"),
    "leases": ("coordination.k8s.io", "v1"),
    "pods": ("metrics.k8s.io", "v1beta1"),
}
KINDS = {"endpointslices": "EndpointSlice", "deployments": "Deployment", "leases": "Lease"}


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    return Status(
        apiVersion="v1",
        kind="Status",
        metadata=ListMeta(),
        status="Failure",
        message=message,
        reason=reason,
        code=code,
        details=details or None,  # type: ignore[arg-type]
    ).to_dict()


@dataclass
class Watch:
    resource: str
    namespace: str
    selector: dict[str, str]
    queue: asyncio.Queue[dict[str, Any] | None]
    bookmarks: bool
    live: bool = True  # False: the watch only says 410 Gone and ends
    writer: asyncio.StreamWriter | None = None


@dataclass
class Fault:
    prefix: str
    code: int
    times: int
    retry_after: float | None = None


@dataclass
class Exchange:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int
    answer: Any  # a dict, or the list of watch events sent
    agent: str = ""  # the client's User-Agent
    at: float = 0.0  # loop time the request arrived
    events: list[dict[str, Any]] = field(default_factory=list)


def selector_of(text: str) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in text.split(",") if "=" in p]
    return {k.strip(): v.strip() for k, v in pairs}


def matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7386); for the maps Portico patches, strategic merge is the same."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeKubeApi(StartStop):
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.version = 100
        self.compacted = 0  # watches from a version below this get 410
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, resource, type, obj)
        self.watches: list[Watch] = []
        self.faults: list[Fault] = []
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource)
        self.metrics: dict[str, dict[str, Any]] | None = None  # pod name -> PodMetrics
        self.delay = 0.0
        self.bookmark_every = 0.5
        self.transcript: list[Exchange] = []
        self.on_change: list[Callable[[str, dict[str, Any]], None]] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    # --- lifecycle, and calls from the test's thread ------------------------------------

    def start(self, timeout: float = 5.0) -> Self:
        self._thread.start()
        self.call(self._listen())
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def stop(self, timeout: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        self.call(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        self.loop.close()

    async def _close(self) -> None:
        self._end_watches(None)
        if self._server is not None:
            self._server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def call(self, work: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def run(self, fn: Callable[[], T]) -> T:
        async def inner() -> T:
            return fn()

        return self.call(inner())

    def kubeconfig(self, directory: Path, token: str = TOKEN, namespace: str = "default") -> Path:
        path = directory / "kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "portico", "user": {"token": token}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {
                                "cluster": "fake",
                                "user": "portico",
                                "namespace": namespace,
                            },
                        }
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path

    # --- faults -------------------------------------------------------------------------

    def fail(
        self, prefix: str, code: int, times: int = 1, retry_after: float | None = None
    ) -> None:
        self.run(lambda: self.faults.append(Fault(prefix, code, times, retry_after)))

    def forbid(self, verb: str, resource: str, allowed: bool = False) -> None:
        self.run(
            lambda: (self.forbidden.discard if allowed else self.forbidden.add)((verb, resource))
        )

    def end_watches(self) -> None:
        """End every watch as the server does after timeoutSeconds: the final chunk."""
        self.run(lambda: self._end_watches(None))

    def drop_watches(self) -> None:
        """Cut every watch stream mid-way: the socket closes without the final chunk."""
        self.run(lambda: self._end_watches("drop"))

    def expire_watches(self) -> None:
        """Send 410 Gone to every watch and compact the history: a re-watch from any version
        seen so far gets 410 too, only a new list helps."""

        def expire() -> None:
            self.compacted = self.version + 1
            self.history.clear()
            self._end_watches("gone")

        self.run(expire)

    def watching(self, resource: str) -> int:
        return self.run(lambda: sum(1 for w in self.watches if w.resource == resource))

    def _end_watches(self, how: str | None) -> None:
        for w in self.watches:
            if how == "gone":
                gone = status(410, "Expired", f"too old resource version: {self.version - 1}")
                w.queue.put_nowait({"type": "ERROR", "object": gone})
                w.queue.put_nowait(None)
            elif how == "drop" and w.writer is not None:
                w.writer.transport.abort()
            else:
                w.queue.put_nowait(None)
        self.watches.clear()

    # --- the store ----------------------------------------------------------------------

    def _next_version(self) -> str:
        self.version += 1
        return str(self.version)

    def put(self, resource: str, obj: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
        """Create or replace ``obj`` (on the fake's loop), stamping a new resourceVersion."""
        meta = obj.setdefault("metadata", {})
        ns, name = meta.get("namespace", "default"), meta["name"]
        key = (resource, ns, name)
        event = kind or ("MODIFIED" if key in self.objects else "ADDED")
        meta["namespace"] = ns
        meta.setdefault("uid", f"uid-{resource}-{ns}-{name}")
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        meta["resourceVersion"] = self._next_version()
        self.objects[key] = obj
        self._publish(resource, event, obj)
        return obj

    def delete(self, resource: str, namespace: str, name: str) -> None:
        obj = self.objects.pop((resource, namespace, name), None)
        if obj is not None:
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = self._next_version()
            self._publish(resource, "DELETED", obj)

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((resource, namespace, name))

    def _publish(self, resource: str, kind: str, obj: dict[str, Any]) -> None:
        snapshot = copy.deepcopy(obj)
        self.history.append((self.version, resource, kind, snapshot))
        for w in self.watches:
            same = w.resource == resource and w.namespace == snapshot["metadata"]["namespace"]
            if same and matches(snapshot, w.selector):
                w.queue.put_nowait({"type": kind, "object": snapshot})
        for hook in self.on_change:
            hook(resource, snapshot)

    # --- HTTP ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                length = int(headers.get("content-length") or 0)
                raw = await reader.readexactly(length) if length else b""
                body = json.loads(raw) if raw else None
                url = urllib.parse.urlsplit(target)
                query = dict(urllib.parse.parse_qsl(url.query))
                if self.delay:
                    await asyncio.sleep(self.delay)
                keep = await self._answer(method, url.path, query, headers, body, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # a client gone, or the fake stopping: nothing to answer
        finally:
            writer.close()

    async def _answer(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: dict[str, str],
        body: Any,
        writer: asyncio.StreamWriter,
    ) -> bool:
        exchange = Exchange(method, path, query, body, 200, None)
        exchange.agent = headers.get("user-agent", "")
        exchange.at = asyncio.get_running_loop().time()
        self.transcript.append(exchange)
        code, answer, extra = self._route(method, path, query, headers, body)
        if isinstance(answer, Watch):
            from tests.support.kubelists import stream

            exchange.answer = exchange.events
            await stream(self, answer, exchange, writer)
            return False
        exchange.status, exchange.answer = code, answer
        data = json.dumps(answer).encode()
        head = f"HTTP/1.1 {code} {'OK' if code < 400 else 'Error'}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in extra.items())
        writer.write(head.encode() + b"\r\n" + data)
        await writer.drain()
        return True

    def _route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any
    ) -> tuple[int, Any, dict[str, str]]:
        if headers.get("authorization") != f"Bearer {TOKEN}":
            return 401, status(401, "Unauthorized", "Unauthorized"), {}
        for fault in self.faults:
            if fault.times > 0 and path.startswith(fault.prefix):
                fault.times -= 1
                extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after else {}
                reason = "TooManyRequests" if fault.code == 429 else "InternalError"
                return fault.code, status(fault.code, reason, "injected fault"), extra
        parts = path.strip("/").split("/")
        # /apis/GROUP/VERSION/namespaces/NS/RESOURCE[/NAME[/SUB]]
        if len(parts) < 6 or parts[0] != "apis" or parts[3] != "namespaces":
            return 404, status(404, "NotFound", f"the server could not find {path}"), {}
        group, ns, resource = parts[1], parts[4], parts[5]
        name = parts[6] if len(parts) > 6 else ""
        sub = parts[7] if len(parts) > 7 else ""
        verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update"}.get(
            method, "patch" if method == "PATCH" else "delete"
        )
        if query.get("watch") == "true":
            verb = "watch"
        full = f"{resource}/{sub}" if sub else resource
        if (verb, full) in self.forbidden:
            # The authorizer's words, e.g. deployments.apps "web" is forbidden: User "..."
            # cannot patch resource "deployments/scale" in API group "apps" in the namespace.
            subject = f'{resource}.{group} "{name}"' if name else f"{resource}.{group}"
            message = (
                f'{subject} is forbidden: User "system:serviceaccount:{ns}:portico" cannot'
                f' {verb} resource "{full}" in API group "{group}" in the namespace "{ns}"'
            )
            details = {"kind": resource, "group": group, **({"name": name} if name else {})}
            return 403, status(403, "Forbidden", message, **details), {}
        from tests.support.kubelists import list_objects, open_watch, pod_metrics

        if resource == "pods" and group == "metrics.k8s.io":
            return pod_metrics(self, ns, query)
        if resource not in KINDS or GROUPS[resource][0] != group:
            return 404, status(404, "NotFound", f"the server could not find {path}"), {}
        if verb == "watch":
            return 200, open_watch(self, resource, ns, query), {}
        if verb == "list":
            return list_objects(self, resource, ns, query)
        from tests.support.kubeverbs import handle

        return handle(self, verb, resource, ns, name, sub, body)
