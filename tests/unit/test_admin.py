"""Pure parts of the admin API: the [admin] schema, the OpenAPI document agreeing with the
routes, secrets kept out of answers, config diffs by key path, status providers."""

from __future__ import annotations

from typing import Any

import pytest

from portico.admin.actions import diff, flatten
from portico.admin.api import ROUTES
from portico.admin.fleet import REDACTED, redact
from portico.admin.openapi import document
from portico.config.load import validate
from portico.errors import ConfigError
from portico.runtime.status import StatusProviders

BASE: dict[str, Any] = {"upstreams": {"app": {"backends": ["http://127.0.0.1:5001"]}}}


def problems(admin: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        validate({**BASE, "admin": admin})
    return info.value.problems


def test_admin_defaults_and_off_by_default() -> None:
    assert validate(BASE).admin is None
    admin = validate({**BASE, "admin": {}}).admin
    assert admin is not None
    assert (admin.listen, admin.token, admin.read, admin.metrics) == (
        "127.0.0.1:9901", None, "open", True,
    )  # fmt: skip


@pytest.mark.parametrize("listen", ["0.0.0.0:9901", "10.1.2.3:9901", "[::]:9901", "example:99"])
def test_a_public_listen_needs_a_token(listen: str) -> None:
    (found,) = problems({"listen": listen})
    assert found[0] == "admin.token"
    assert f"the admin listener on {listen} is not loopback-only" in found[1]
    assert validate({**BASE, "admin": {"listen": listen, "token": "long-enough"}}).admin
    assert validate({**BASE, "admin": {"listen": listen, "tokens": {"ci": "long-enough"}}}).admin


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:9901", "[::1]:9901", "localhost:9901", "127.9.9.9:1"]
)
def test_loopback_needs_no_token(listen: str) -> None:
    assert validate({**BASE, "admin": {"listen": listen}}).admin is not None


def test_admin_refuses_bad_values_by_key_path() -> None:
    assert problems({"token": "short"})[0][0] == "admin.token"
    assert problems({"tokens": {"bad name": "long-enough"}})[0][0] == "admin.tokens"
    assert problems({"read": "maybe"})[0][0] == "admin.read"
    assert problems({"listen": "", "unix_socket": None})[0][0] == "admin.listen"
    assert problems({"bogus": 1})[0][0] == "admin.bogus"


def test_tokens_by_name() -> None:
    admin = validate({**BASE, "admin": {"token": "token-one", "tokens": {"ci": "token-two"}}}).admin
    assert admin is not None
    assert admin.all_tokens() == {"token-one": "admin", "token-two": "ci"}


def test_openapi_documents_exactly_the_routes() -> None:
    doc = document()
    documented = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    assert documented == {(method, path) for method, path, _, _ in ROUTES}
    # Every action declares the token; no read does.
    for method, path, _, access in ROUTES:
        op = doc["paths"][path][method.lower()]
        assert ("security" in op) is (access == "action"), path
        assert ("401" in op["responses"]) is (access != "public"), path
    assert {path for _, path, _, access in ROUTES if access == "public"} == {
        "/", "/static/{file}", "/api/openapi.json",
    }  # fmt: skip


def test_secrets_never_leave() -> None:
    data = {
        "admin": {"token": "t0ken-value", "tokens": {"ci": "x" * 10}},
        "upstreams": {"a": {"sticky": {"secret": "s3cret", "cookie": "c"}}},
        "redis": {"url": "redis://user:pa55@host:6379/0"},
        "other": {"token": None},
    }
    out = redact(data)
    assert out["admin"] == {"token": REDACTED, "tokens": REDACTED}
    assert out["upstreams"]["a"]["sticky"] == {"secret": REDACTED, "cookie": "c"}
    assert out["redis"]["url"] == f"redis://user:{REDACTED}@host:6379/0"
    assert out["other"] == {"token": None}
    assert "pa55" not in repr(out) and "s3cret" not in repr(out)


def test_diff_by_key_path() -> None:
    old = {
        "server": {"workers": 1},
        "upstreams": {"a": {"backends": [{"url": "u1"}, {"url": "u2"}]}},
    }
    new = {"server": {"workers": 2}, "upstreams": {"a": {"backends": [{"url": "u1"}]}}}
    assert flatten(old)["upstreams.a.backends[1].url"] == "u2"
    assert diff(old, new) == [
        {"path": "server.workers", "old": 1, "new": 2},
        {"path": "upstreams.a.backends[1].url", "old": "u2", "new": None},
    ]
    assert diff(old, old) == []
    # Lists of plain values are one leaf: a reordered listen list is one change.
    assert diff({"l": ["a", "b"]}, {"l": ["b", "a"]}) == [
        {"path": "l", "old": ["a", "b"], "new": ["b", "a"]}
    ]


def test_status_providers() -> None:
    providers = StatusProviders()
    providers.register("tls", lambda: {"certificates": 2, "expires_in_days": 40})

    def broken() -> dict[str, Any]:
        raise RuntimeError("no leader yet")

    providers.register("leader", broken)
    assert providers.collect() == {
        "leader": {"error": "RuntimeError: no leader yet"},
        "tls": {"certificates": 2, "expires_in_days": 40},
    }
    providers.unregister("leader")
    assert providers.names() == ["tls"]


def test_ejection_changes_become_events() -> None:
    from portico.admin.fleet import ejection_changes

    assert ejection_changes({}, {}) == []
    assert ejection_changes({}, {("app", "h:1"): 1}) == [
        ("app", "h:1 ejected (outlier detection, 1 process(es))")
    ]
    assert ejection_changes({("app", "h:1"): 1}, {("app", "h:1"): 2}) == [
        ("app", "h:1 ejected by 2 process(es) (was 1)")
    ]
    assert ejection_changes({("app", "h:1"): 2, ("b", "h:2"): 1}, {("b", "h:2"): 1}) == [
        ("app", "h:1 back after ejection")
    ]


def test_reload_keeps_the_admin_listener_as_it_runs() -> None:
    from portico.gateway import prepare_reload

    running = validate({**BASE, "admin": {"listen": "0.0.0.0:9901", "token": "token-one"}})
    # A new token applies; a new address waits for a restart.
    new = validate({**BASE, "admin": {"listen": "127.0.0.1:9902", "token": "token-two"}})
    config, result = prepare_reload(running, new)
    assert result.applied and result.restart_required == ["admin.listen"]
    assert config.admin is not None
    assert (config.admin.listen, config.admin.token) == ("0.0.0.0:9901", "token-two")
    # Dropping [admin] keeps it running (and guarded) until a restart.
    config, result = prepare_reload(running, validate(BASE))
    assert result.applied and result.restart_required == ["admin"]
    assert config.admin == running.admin
    # No token left while the running listener is public: refused.
    new = validate({**BASE, "admin": {"listen": "127.0.0.1:9901"}})
    config, result = prepare_reload(running, new)
    assert not result.applied and config is running
    assert result.problems == [
        (
            "admin.token",
            "the running admin listener on 0.0.0.0:9901 is not loopback-only: keep a token",
        )
    ]


def test_status_screen_names_the_kubernetes_leader() -> None:
    from portico.admin.console import Poll, render

    status = {"version": "x", "pid": 1, "workers": 1, "uptime": 5.0, "listen": ["a:1"]}
    plain = render(Poll(0.0, status, [], []))
    assert not [line for line in plain if line.startswith("kubernetes")]
    follower = {"leader": False, "holder": "p1"}
    lines = render(Poll(0.0, {**status, "providers": {"kubernetes": {"leader": follower}}}, [], []))
    assert "kubernetes: follower (leader: p1)" in lines
    lines = render(Poll(0.0, {**status, "providers": {"kubernetes": {"leader": {"leader": True}}}},
                        [], []))  # fmt: skip
    assert "kubernetes: leader" in lines
