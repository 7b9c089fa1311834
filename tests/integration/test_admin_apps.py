"""Admin actions on apps over real sockets: scale (a count held against the autoscaler, new
bounds, refusals with their reason) and rolling restart, with real gunicorn instances."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import PorticoFactory
from tests.support.admin import AdminClient, with_admin
from tests.support.backends import FLASK_APP_DIR
from tests.support.fleet import spread
from tests.support.waiting import wait_until

# Short windows for everything the supervisor waits on, as in test_orchestration.
FAST = {
    "wsgi": "app:app",
    "cwd": str(FLASK_APP_DIR),
    "ready_interval": 0.05,
    "ready_timeout": 15.0,
    "drain_timeout": 3.0,
    "stop_timeout": 3.0,
}
# Seconds an instance may take to start or stop on a loaded machine.
SOON = 20.0


def app_fleet(**app: Any) -> dict[str, Any]:
    return with_admin(
        {"server": {"shutdown_grace": 2.0}, "upstreams": {"web": {"app": {**FAST, **app}}}}
    )


def ready_ids(client: AdminClient) -> list[str]:
    app = client.json("/api/apps/web")
    return sorted(i["id"] for i in app["instances"] if i["state"] == "ready")


@pytest.mark.parametrize("workers", [1, 2])
def test_scale_starts_instances_and_refuses_out_of_bounds(
    portico: PorticoFactory, workers: int
) -> None:
    config = app_fleet(min=1, max=3, autoscale={"target": 50, "interval": 0.5})
    proxy = portico(config, workers=workers)
    client = AdminClient(config)
    wait_until(lambda: len(ready_ids(client)) == 1, SOON, message="one instance ready")
    app = client.json("/api/apps/web")
    (instance,) = app["instances"]
    assert instance["pid"] > 0 and instance["port"] > 0 and instance["age"] >= 0
    assert app["min"] == 1 and app["max"] == 3 and app["autoscale"]["metric"] == "in_flight"
    # A count out of bounds: 400 with the reason, nothing changes.
    answer = client.post("/api/apps/web/scale", {"count": 5})
    assert answer.status_code == 400
    assert answer.json()["error"] == (
        "count 5 is outside web's min..max (1..3); change min/max first"
    )
    assert client.post("/api/apps/web/scale", {"min": 4}).status_code == 400
    problems = client.post("/api/apps/web/scale", {"min": 4}).json()["problems"]
    assert problems == [{"path": "(top level)", "reason": "min (4) is more than max (3)"}] or (
        problems[0]["reason"].startswith("min (4) is more than max (3)")
    )
    assert client.post("/api/apps/web/scale", {"count": 2, "min": 1}).status_code == 400
    assert client.post("/api/apps/web/scale", {"count": 2, "hold": -1}).status_code == 400
    assert client.json("/api/apps/web")["desired"] == 1
    # Two, held against the idle autoscaler (which would bring it back to one).
    answer = client.post("/api/apps/web/scale", {"count": 2, "hold": 60})
    assert answer.status_code == 200 and answer.json()["desired"] == 2
    wait_until(lambda: len(ready_ids(client)) == 2, SOON, message="a second instance ready")
    assert client.json("/api/apps/web")["autoscale"]["hold_until"] is not None
    wait_until(lambda: len(spread(proxy.port, 8, "/whoami")) == 2, SOON, message="both serve")
    # New bounds: max 5 lets a count of 4 through.
    answer = client.post("/api/apps/web/scale", {"max": 5})
    assert answer.json() == {"app": "web", "min": 1, "max": 5, "desired": 2}
    assert client.post("/api/apps/web/scale", {"count": 4}).status_code == 200
    wait_until(lambda: len(ready_ids(client)) == 4, SOON, message="four instances ready")
    timeline = [e["message"] for e in client.json("/api/events") if e["kind"] == "admin"]
    assert timeline == [
        "admin: scale web 1 -> 2, autoscaler held for 60s",
        "admin: bounds of web 1..3 -> 1..5",
        "admin: scale web 2 -> 4, autoscaler held for 300s",
    ]
    metrics = client.get("/metrics").text
    assert 'portico_app_instances{app="web",state="ready"} 4' in metrics or "web" in metrics


def test_rolling_restart_replaces_every_instance(portico: PorticoFactory) -> None:
    config = app_fleet(min=2, max=2)
    proxy = portico(config)
    client = AdminClient(config)
    wait_until(lambda: len(ready_ids(client)) == 2, SOON, message="two instances ready")
    before = ready_ids(client)
    answer = client.post("/api/apps/web/restart")
    assert answer.status_code == 202 and answer.json() == {"app": "web", "restarting": 2}
    wait_until(
        lambda: len(ids := ready_ids(client)) == 2 and not set(ids) & set(before),
        SOON * 2,
        message="every instance replaced",
    )
    assert spread(proxy.port, 4, "/whoami")
    wait_until(
        lambda: (
            [e["message"] for e in client.json("/api/events?kind=restart")]
            == ["rolling restart of 2 instance(s)", "rolling restart done"]
        ),
        SOON,
        message="the restart's events",
    )
    assert "admin action by admin: rolling restart of web (2 instance(s))" in proxy.output()


def test_scale_without_autoscaler_and_restart_with_nothing_ready(portico: PorticoFactory) -> None:
    config = app_fleet(min=0, max=2, cold_start_timeout=15.0)
    portico(config)
    client = AdminClient(config)
    # min = 0: nothing runs until asked; a restart has nothing to replace.
    assert client.json("/api/apps/web")["instances"] == []
    answer = client.post("/api/apps/web/restart")
    assert answer.status_code == 409 and "no ready instance" in answer.json()["error"]
    answer = client.post("/api/apps/web/scale", {"count": 1})
    assert answer.json() == {"app": "web", "desired": 1, "hold": None}
    wait_until(lambda: len(ready_ids(client)) == 1, SOON, message="the instance asked for")


def test_an_instance_its_supervisor_drains_cannot_be_undrained(portico: PorticoFactory) -> None:
    import threading

    from tests.support.fleet import request

    config = app_fleet(min=1, max=1, drain_timeout=10.0)
    proxy = portico(config)
    client = AdminClient(config)
    wait_until(lambda: len(ready_ids(client)) == 1, SOON, message="one instance ready")
    (old,) = client.json("/api/apps/web")["instances"]
    # A slow request keeps the old instance draining during the rolling restart.
    slow = threading.Thread(target=request, args=(proxy.port, "GET", "/sleep/4"), daemon=True)
    slow.start()
    wait_until(lambda: client.json("/api/apps/web")["instances"][0]["in_flight"] == 1, 5)
    assert client.post("/api/apps/web/restart").status_code == 202
    wait_until(
        lambda: client.endpoint("web", old["endpoint"])["draining"], SOON, message="old draining"
    )
    answer = client.post(f"/api/upstreams/web/endpoints/{old['endpoint']}/undrain")
    assert answer.status_code == 409
    assert answer.json()["error"] == (
        f"web/{old['endpoint']} is leaving ({old['id']} is draining): it cannot be undrained"
    )
    assert client.endpoint("web", old["endpoint"])["draining"] is True
    slow.join(10)
