"""A client for Portico's admin listener, and configs that turn it on at a free port."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.support.ports import free_port
from tests.support.waiting import wait_for_port

TOKEN = "test-token-123"


def with_admin(config: dict[str, Any], **admin: Any) -> dict[str, Any]:
    """``config`` with an ``[admin]`` table on a free loopback port (token TOKEN unless given)."""
    table = {"listen": f"127.0.0.1:{free_port()}", "token": TOKEN, **admin}
    return {**config, "admin": {k: v for k, v in table.items() if v is not None}}


class AdminClient:
    """httpx against the admin listener of a running Portico, with or without the token."""

    def __init__(self, config: dict[str, Any], token: str | None = TOKEN) -> None:
        self.base = f"http://{config['admin']['listen']}"
        self.token = token
        # Portico binds its traffic listeners first: the admin one follows within moments.
        host, _, port = config["admin"]["listen"].rpartition(":")
        wait_for_port(int(port), timeout=10, host=host)

    def headers(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.base + path, headers=self.headers(token), timeout=10, **kwargs)

    def json(self, path: str) -> Any:
        response = self.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def post(
        self,
        path: str,
        body: dict[str, Any] | str | None = None,
        token: str | None = "default",
        **kwargs: Any,
    ) -> httpx.Response:
        token = self.token if token == "default" else token
        content = json.dumps(body) if isinstance(body, dict) else (body or "")
        return httpx.post(
            self.base + path, content=content, headers=self.headers(token), timeout=30, **kwargs
        )

    def endpoint(self, upstream: str, label: str) -> dict[str, Any]:
        up = self.json(f"/api/upstreams/{upstream}")
        (found,) = [e for e in up["endpoints"] if e["endpoint"] == label]
        return dict(found)
