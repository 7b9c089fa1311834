"""The Kubernetes API as Portico uses it: a few JSON requests and watch streams.

Built on lightkube (``pip install portico[kubernetes]``): its ``KubeConfig`` finds the
cluster (the pod's service account, ``$KUBECONFIG``, ``~/.kube/config``, exec and token
auth, the CA) and builds the authenticated HTTP client; its models validate what the API
sends. The requests themselves are written here because the watch needs what lightkube's
does not do: ``allowWatchBookmarks``, and a re-list (not a blind re-watch) after 410 Gone,
without which a deletion made while the watch was down is never seen.

Every failure is a ``KubeError`` that says what was asked and, for a refusal, which
permission is missing, in the words of a Role rule.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from portico.config.kube import Kubernetes

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Seconds for a request; a watch has no read timeout (the server ends it with timeoutSeconds).
REQUEST_TIMEOUT = 10.0
# Asked of the server per watch; it closes the stream after this and we re-watch (client-go
# picks 5-10 minutes at random; one value is enough for one process).
WATCH_SECONDS = 300

# API group paths of what Portico touches: used in requests and in RBAC explanations.
GROUPS = {
    "endpointslices": "discovery.k8s.io",
    "deployments": "apps",
    "deployments/scale": "apps",
    "leases": "coordination.k8s.io",
    "pods": "metrics.k8s.io",
}


class KubeError(Exception):
    """A request that failed, with what it was and what the API said."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        verb: str = "",
        resource: str = "",
        namespace: str = "",
        name: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.verb = verb
        self.resource = resource
        self.namespace = namespace
        self.name = name
        self.retry_after = retry_after
        super().__init__(message)

    @property
    def gone(self) -> bool:
        return self.status == 410

    def explain(self) -> str:
        """One line a person can act on."""
        what = f"{self.resource}/{self.name}" if self.name else self.resource
        where = f" in namespace {self.namespace}" if self.namespace else ""
        said = str(self)
        if self.status == 403:
            group = GROUPS.get(self.resource, "")
            return (
                f"forbidden: cannot {self.verb} {what}{where}; the service account needs a Role"
                f" rule apiGroups: [{group!r}], resources: [{self.resource!r}],"
                f" verbs: [{self.verb!r}] ({said})"
            )
        if self.status == 401:
            return f"unauthorized: the API refused the credentials ({said})"
        if self.status == 404:
            return f"not found: {what}{where} does not exist ({said})"
        if self.status == 0:
            return f"cannot reach the API server: {said}"
        return f"{self.verb} {what}{where}: {self.status} {said}"


def load_config(settings: Kubernetes) -> Any:
    """The lightkube ``SingleConfig`` to use, or a KubeError saying what is missing."""
    try:
        from lightkube import ConfigError, KubeConfig
    except ImportError as exc:
        raise KubeError(
            0, "the kubernetes extra is not installed: pip install 'portico[kubernetes]'"
        ) from exc
    try:
        if settings.kubeconfig is not None:
            if not os.path.exists(settings.kubeconfig):
                raise KubeError(0, f"kubernetes.kubeconfig: no file {settings.kubeconfig}")
            found = KubeConfig.from_file(settings.kubeconfig)
        elif (SERVICE_ACCOUNT / "token").exists() and os.environ.get("KUBERNETES_SERVICE_HOST"):
            found = KubeConfig.from_service_account()
        else:
            path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            if not os.path.exists(path):
                raise KubeError(
                    0,
                    f"no service account token at {SERVICE_ACCOUNT}/token (not in a pod, or"
                    " automountServiceAccountToken is false) and no kubeconfig at"
                    f" {path}: set kubernetes.kubeconfig or $KUBECONFIG",
                )
            found = KubeConfig.from_file(path)
        return found.get(settings.context)
    except ConfigError as exc:
        raise KubeError(0, f"kubeconfig: {exc}") from exc


class KubeApi:
    """One authenticated client for every Kubernetes feature of one Portico."""

    def __init__(self, settings: Kubernetes) -> None:
        self.settings = settings
        self._client: Any = None
        self.namespace = settings.namespace or "default"
        # Names this Portico in the API server's audit log (and tells replicas apart).
        self.user_agent = "portico"

    def open(self) -> None:
        """Load the config and build the client (raises KubeError with what is missing)."""
        if self._client is not None:
            return
        config = load_config(self.settings)
        from lightkube.config.client_adapter import AsyncClient, ConnectionParams

        try:
            import httpx2 as httpx
        except ImportError:  # lightkube before 1.0 is built on httpx
            import httpx  # type: ignore[no-redef]
        if config.user is None:
            raise KubeError(0, f"kubeconfig context {config.context_name!r} has no user")
        # Its client logs every request at INFO: a watch re-opened every few minutes, scale
        # reads every 2 s. Portico logs what matters (errors, changes) itself.
        logging.getLogger(httpx.__name__).setLevel(logging.WARNING)
        params = ConnectionParams(timeout=httpx.Timeout(REQUEST_TIMEOUT))
        self._client = AsyncClient(config, params)
        self._httpx = httpx
        self.namespace = self.settings.namespace or config.namespace

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # --- requests -----------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        verb: str,
        resource: str,
        namespace: str = "",
        name: str = "",
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        self.open()
        httpx = self._httpx
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        content = None
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        where: dict[str, Any] = {
            "verb": verb,
            "resource": resource,
            "namespace": namespace,
            "name": name,
        }
        try:
            resp = await self._client.request(
                method, path, params=params, content=content, headers=headers
            )
        except httpx.HTTPError as exc:
            raise KubeError(0, f"{type(exc).__name__}: {exc}", **where) from exc
        if resp.status_code >= 400:
            raise _error(resp.status_code, resp.content, resp.headers, where)
        data = json.loads(resp.content)
        return data if isinstance(data, dict) else {}

    async def watch(
        self,
        path: str,
        params: dict[str, str],
        *,
        resource: str,
        namespace: str,
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of a watch, one dict each ({"type", "object"}), until the server ends
        it. An ERROR event becomes a KubeError (410 Gone: ``.gone``)."""
        self.open()
        httpx = self._httpx
        where: dict[str, Any] = {"verb": "watch", "resource": resource, "namespace": namespace}
        query = {**params, "watch": "true", "allowWatchBookmarks": "true"}
        query.setdefault("timeoutSeconds", str(WATCH_SECONDS))
        timeout = httpx.Timeout(REQUEST_TIMEOUT, read=None)
        try:
            async with self._client.stream(
                "GET",
                path,
                params=query,
                headers={"Accept": "application/json", "User-Agent": self.user_agent},
                timeout=timeout,
            ) as resp:
                if resp.status_code >= 400:
                    raise _error(resp.status_code, await resp.aread(), resp.headers, where)
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise _error(int(status.get("code") or 500), line.encode(), {}, where)
                    yield event
        except httpx.HTTPError as exc:
            raise KubeError(0, f"watch broken: {type(exc).__name__}: {exc}", **where) from exc


def _error(status: int, body: bytes, headers: Any, where: dict[str, Any]) -> KubeError:
    message = body.decode("utf-8", "replace")[:300]
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            obj = data.get("object") if data.get("type") == "ERROR" else data
            if isinstance(obj, dict):
                message = str(obj.get("message") or obj.get("reason") or message)
    except ValueError:
        pass
    retry_after = None
    said = headers.get("Retry-After") if headers else None
    if said is not None:
        try:
            retry_after = float(said)
        except ValueError:
            retry_after = None
    return KubeError(status, message, retry_after=retry_after, **where)
