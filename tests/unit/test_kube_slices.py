"""runtime.slices: EndpointSlices to endpoint rows, conditions as the API reference defines them.

The slices are built with lightkube's models (the client library's own shapes), then
turned into the JSON the API serves (``to_dict``), which is what the watcher hands over.
"""

from __future__ import annotations

from typing import Any

import pytest
from lightkube.models.core_v1 import ObjectReference
from lightkube.models.discovery_v1 import Endpoint, EndpointConditions, EndpointPort
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.discovery_v1 import EndpointSlice

from portico.runtime.slices import endpoint_rows, slice_port

HTTP = [EndpointPort(name="http", port=8000, protocol="TCP")]


def ep(ip: str, pod: str | None = None, **conditions: bool | None) -> Endpoint:
    ref = (
        ObjectReference(kind="Pod", name=pod, namespace="default", uid=f"u-{pod}") if pod else None
    )
    return Endpoint(addresses=[ip], conditions=EndpointConditions(**conditions), targetRef=ref)


def slice_(
    *endpoints: Endpoint,
    ports: list[EndpointPort] | None = None,
    family: str = "IPv4",
    name: str = "web-abc",
) -> dict[str, Any]:
    return EndpointSlice(
        apiVersion="discovery.k8s.io/v1",
        kind="EndpointSlice",
        addressType=family,
        metadata=ObjectMeta(name=name, labels={"kubernetes.io/service-name": "web"}),
        endpoints=list(endpoints),
        ports=HTTP if ports is None else ports,
    ).to_dict()


def test_missing_ready_means_ready() -> None:
    sl = slice_(ep("10.0.0.1"), ep("10.0.0.2", ready=None, serving=True))
    assert "ready" not in sl["endpoints"][0].get("conditions", {})
    rows, problems = endpoint_rows([sl], "http", set())
    assert rows == [("10.0.0.1", 8000, False), ("10.0.0.2", 8000, False)]
    assert problems == []


def test_not_ready_is_left_out_until_ready() -> None:
    sl = slice_(ep("10.0.0.1", ready=False, serving=False, terminating=False))
    assert endpoint_rows([sl], None, set()) == ([], [])


def test_terminating_drains_a_known_endpoint_serving_or_not() -> None:
    known = {("10.0.0.1", 8000), ("10.0.0.2", 8000)}
    sl = slice_(
        ep("10.0.0.1", ready=False, serving=True, terminating=True),
        ep("10.0.0.2", ready=False, serving=False, terminating=True),
        ep("10.0.0.3", ready=False, serving=True, terminating=True),  # never seen: not added
    )
    rows, _ = endpoint_rows([sl], "http", known)
    assert rows == [("10.0.0.1", 8000, True), ("10.0.0.2", 8000, True)]


def test_unready_known_endpoint_drains_and_comes_back() -> None:
    known = {("10.0.0.1", 8000)}
    down = slice_(ep("10.0.0.1", ready=False, serving=False))
    assert endpoint_rows([down], None, known)[0] == [("10.0.0.1", 8000, True)]
    up = slice_(ep("10.0.0.1", ready=True))
    assert endpoint_rows([up], None, known)[0] == [("10.0.0.1", 8000, False)]


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [("http", 8000), ("metrics", 9100), (9100, 9100), (8000, 8000), (None, 8000), ("grpc", None)],
)
def test_port_by_name_or_number(wanted: str | int | None, expected: int | None) -> None:
    ports = [
        EndpointPort(name="http", port=8000, protocol="TCP").to_dict(),
        EndpointPort(name="metrics", port=9100, protocol="TCP").to_dict(),
    ]
    assert slice_port(ports, wanted) == expected


def test_udp_port_is_not_used_and_missing_port_is_reported() -> None:
    ports = [EndpointPort(name="dns", port=53, protocol="UDP")]
    sl = slice_(ep("10.0.0.1"), ports=ports)
    rows, problems = endpoint_rows([sl], None, set())
    assert rows == []
    assert problems == ["slice web-abc: no port None (ports: dns=53)"]


def test_same_address_in_two_slices_is_one_endpoint() -> None:
    a = slice_(ep("10.0.0.1", "p1", ready=True), name="web-a")
    b = slice_(ep("10.0.0.1", "p1", ready=True), ep("10.0.0.2", "p2"), name="web-b")
    rows, _ = endpoint_rows([a, b], "http", set())
    assert rows == [("10.0.0.1", 8000, False), ("10.0.0.2", 8000, False)]


def test_dual_stack_one_endpoint_per_pod_ipv4_first_ipv6_only_kept() -> None:
    v4 = slice_(ep("10.0.0.1", "p1"), name="web-v4")
    v6 = slice_(ep("fd00::1", "p1"), ep("fd00::2", "p2"), family="IPv6", name="web-v6")
    rows, _ = endpoint_rows([v6, v4], "http", set())
    assert rows == [("10.0.0.1", 8000, False), ("fd00::2", 8000, False)]


def test_fqdn_and_unknown_families() -> None:
    fqdn = slice_(ep("web-0.example.internal"), family="FQDN")
    assert endpoint_rows([fqdn], None, set())[0] == [("web-0.example.internal", 8000, False)]
    odd = slice_(ep("x"), family="IPX")
    assert endpoint_rows([odd], None, set())[1] == [
        "slice web-abc: address type 'IPX' not supported"
    ]


def test_ready_copy_beats_terminating_copy_of_the_same_pod() -> None:
    known = {("10.0.0.1", 8000)}
    a = slice_(ep("10.0.0.1", "p1", ready=False, terminating=True), name="web-a")
    b = slice_(ep("10.0.0.1", "p1", ready=True), name="web-b")
    assert endpoint_rows([a, b], None, known)[0] == [("10.0.0.1", 8000, False)]
