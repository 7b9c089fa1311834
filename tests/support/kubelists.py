"""The fake API's collection verbs: list (with pages), watch (history, live events,
bookmarks, 410 Gone) and the metrics.k8s.io PodMetrics list. See ``kubeapi``."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import TYPE_CHECKING, Any

from lightkube.models.meta_v1 import ListMeta, ObjectMeta

from tests.support.kubeapi import GROUPS, KINDS, Exchange, Watch, matches, selector_of, status

if TYPE_CHECKING:
    from tests.support.kubeapi import FakeKubeApi


def list_objects(
    api: FakeKubeApi, resource: str, ns: str, query: dict[str, str]
) -> tuple[int, Any, dict[str, str]]:
    selector = selector_of(query.get("labelSelector", ""))
    found = [
        copy.deepcopy(o)
        for (r, n, _), o in sorted(api.objects.items())
        if r == resource and n == ns and matches(o, selector)
    ]
    limit = int(query.get("limit") or 0) or len(found) or 1
    start = int(query.get("continue") or 0)
    page = found[start : start + limit]
    more = start + limit < len(found)
    group, version = GROUPS[resource]
    meta = ListMeta(
        resourceVersion=str(api.version), **({"continue_": str(start + limit)} if more else {})
    )
    return (
        200,
        {
            "apiVersion": f"{group}/{version}",
            "kind": f"{KINDS[resource]}List",
            "metadata": meta.to_dict(),
            "items": page,
        },
        {},
    )


def open_watch(api: FakeKubeApi, resource: str, ns: str, query: dict[str, str]) -> Watch:
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    selector = selector_of(query.get("labelSelector", ""))
    since = query.get("resourceVersion")
    watch = Watch(resource, ns, selector, queue, query.get("allowWatchBookmarks") == "true")
    if since and int(since) < api.compacted:
        watch.live = False
        gone = status(410, "Expired", f"too old resource version: {since} ({api.compacted})")
        queue.put_nowait({"type": "ERROR", "object": gone})
        queue.put_nowait(None)
    elif since:
        for rv, res, kind, obj in api.history:
            same = res == resource and obj["metadata"]["namespace"] == ns
            if rv > int(since) and same and matches(obj, selector):
                queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})
    else:  # no version: the current state as ADDED events, then changes
        for (res, n, _), obj in sorted(api.objects.items()):
            if res == resource and n == ns and matches(obj, selector):
                queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(obj)})
    return watch


async def stream(
    api: FakeKubeApi, watch: Watch, exchange: Exchange, writer: asyncio.StreamWriter
) -> None:
    watch.writer = writer
    if watch.live:
        api.watches.append(watch)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    try:
        while True:
            try:
                event = await asyncio.wait_for(watch.queue.get(), api.bookmark_every)
            except TimeoutError:
                if not watch.bookmarks:
                    continue
                group, version = GROUPS[watch.resource]
                event = {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": KINDS[watch.resource],
                        "apiVersion": f"{group}/{version}",
                        "metadata": ObjectMeta(resourceVersion=str(api.version)).to_dict(),
                    },
                }
            if event is None:
                writer.write(b"0\r\n\r\n")
                break
            exchange.events.append(event)
            line = json.dumps(event).encode() + b"\n"
            writer.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        if watch in api.watches:
            api.watches.remove(watch)


def pod_metrics(
    api: FakeKubeApi, ns: str, query: dict[str, str]
) -> tuple[int, Any, dict[str, str]]:
    if api.metrics is None:
        return (
            404,
            status(404, "NotFound", "the server could not find the requested resource"),
            {},
        )
    selector = selector_of(query.get("labelSelector", ""))
    items = [m for m in api.metrics.values() if matches(m, selector)]
    return (
        200,
        {
            "kind": "PodMetricsList",
            "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {},
            "items": copy.deepcopy(items),
        },
        {},
    )
