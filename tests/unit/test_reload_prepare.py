"""What a reload runs: static keys reported and kept, sticky secrets carried, sections named."""

from __future__ import annotations

from typing import Any

from portico.config.model import Config
from portico.gateway import ReloadResult, prepare_reload, with_secrets


def config(**changes: Any) -> Config:
    data: dict[str, Any] = {
        "server": {"listen": ["127.0.0.1:8080"], "workers": 2},
        "upstreams": {"api": {"backends": ["http://127.0.0.1:9001"], "sticky": {}}},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        data.setdefault(section, {})[name] = value
    return Config.model_validate(data)


def test_static_keys_are_reported_and_keep_their_running_values() -> None:
    running = with_secrets(config())
    new = config(server__listen=["127.0.0.1:9090"], server__workers=4, server__backlog=16)
    applied, result = prepare_reload(running, new)
    assert result == ReloadResult(
        True, restart_required=["server.listen", "server.workers", "server.backlog"], changed=[]
    )
    assert applied.server == running.server


def test_the_rest_of_server_applies_and_sections_are_named() -> None:
    running = with_secrets(config())
    new = config(server__shutdown_grace=3.0, access_log__format="json")
    applied, result = prepare_reload(running, new)
    assert result.restart_required == []
    assert result.changed == ["server", "access_log"]
    assert applied.server.shutdown_grace == 3.0


def test_sticky_secrets_carry_over_and_new_ones_are_filled() -> None:
    running = with_secrets(config())
    secret = running.upstreams["api"].sticky.secret
    assert secret
    new = Config.model_validate(
        {
            "server": {"listen": ["127.0.0.1:8080"], "workers": 2},
            "upstreams": {
                "api": {"backends": ["http://127.0.0.1:9001"], "sticky": {}},
                "web": {"backends": ["http://127.0.0.1:9002"], "sticky": {}},
            },
            "routes": [{"path": "/", "upstream": "api"}, {"path": "/w", "upstream": "web"}],
        }
    )
    applied, result = prepare_reload(running, new)
    assert applied.upstreams["api"].sticky.secret == secret
    assert applied.upstreams["web"].sticky.secret
    assert result.changed == ["upstreams", "routes"]
