"""HTTP details independent clients and checkers look at, each against its RFC, through a
real Portico to a raw backend that echoes what reached it.

- extension methods (any token, RFC 9110 9.1) are forwarded, not refused;
- ``Date`` (RFC 9110 6.6.1) is added to responses lacking one and to Portico's own answers,
  and a backend's own is kept;
- an unknown transfer coding is 501 (RFC 9112 6.1);
- header names with underscores are dropped by default (configurable), and never shadow a
  forwarding header Portico sets.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest

from tests.conftest import PorticoFactory, RawBackendFactory
from tests.support.backends import echo_http, respond
from tests.support.rawhttp import RawConnection, RawResponse

NO_DATE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OWN_DATE = b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 2\r\n\r\nok"


def config_for(url: str, **limits: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"upstreams": {"app": {"backends": [url]}}}
    if limits:
        config["server"] = {"limits": limits}
    return config


def assert_fresh_date(response: RawResponse) -> None:
    values = response.header_values("Date")
    assert len(values) == 1, response.raw
    when = email.utils.parsedate_to_datetime(values[0]).timestamp()
    assert abs(when - time.time()) < 5, values[0]
    assert values[0].endswith(" GMT")


@pytest.mark.parametrize("method", ["VERSION-CONTROL", "LABEL", "MKREDIRECTREF", "BAN", "PURGE"])
def test_extension_methods_are_forwarded(
    method: str, raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backend = raw_backend(echo_http())
    proxy = portico(config_for(backend.url))
    with RawConnection(proxy.port) as conn:
        response = conn.request(method, "/thing", body=b"data")
        assert response.status == 200, response.raw
        assert response.json()["method"] == method
        # The connection stays usable, and pipelined extension methods keep their order.
        conn.send(
            b"BAN /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"LABEL /3 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx"
        )
        seen = [conn.recv_response().json() for _ in range(3)]
    assert [(s["method"], s["target"]) for s in seen] == [
        ("BAN", "/1"),
        ("GET", "/2"),
        ("LABEL", "/3"),
    ]


def test_date_is_added_when_missing_and_kept_when_present(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    without = portico(config_for(raw_backend(respond(NO_DATE)).url))
    with RawConnection(without.port) as conn:
        assert_fresh_date(conn.request("GET", "/"))
    with_own = portico(config_for(raw_backend(respond(OWN_DATE)).url))
    with RawConnection(with_own.port) as conn:
        response = conn.request("GET", "/")
    assert response.header_values("Date") == ["Sun, 06 Nov 1994 08:49:37 GMT"]


def test_portico_own_answers_carry_a_date(portico: PorticoFactory) -> None:
    proxy = portico(config_for("http://127.0.0.1:1"))  # nothing listens there: 502
    with RawConnection(proxy.port) as conn:
        response = conn.request("GET", "/")
    assert response.status == 502
    assert_fresh_date(response)
    with RawConnection(proxy.port) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        response = conn.recv_response()
    assert response.status == 400
    assert_fresh_date(response)


def test_local_replies_carry_a_date(portico: PorticoFactory) -> None:
    config = config_for("http://127.0.0.1:1")
    config["routes"] = [
        {"path": "/hello", "respond": {"body": "hi"}},
        {"path": "/app/", "upstream": "app"},
    ]
    proxy = portico(config)
    with RawConnection(proxy.port) as conn:
        response = conn.request("GET", "/hello")
        assert (response.status, response.body) == (200, b"hi")
        assert_fresh_date(response)
        missing = conn.request("GET", "/elsewhere")
    assert missing.status == 404
    assert_fresh_date(missing)


def test_an_unknown_transfer_coding_is_501(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backend = raw_backend(echo_http())
    proxy = portico(config_for(backend.url))
    with RawConnection(proxy.port) as conn:
        conn.send(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
        )
        response = conn.recv_response()
        assert response.status == 501, response.raw
        assert conn.closed(timeout=3.0)
    assert backend.received == []


UNDERSCORES = [("X_Forwarded_For", "6.6.6.6"), ("X_Real_IP", "6.6.6.6"), ("My_Header", "1")]


def forwarded_names(proxy_port: int) -> dict[str, str]:
    with RawConnection(proxy_port) as conn:
        response = conn.request("GET", "/", headers=UNDERSCORES)
    assert response.status == 200, response.raw
    return {name: value for name, value in response.json()["headers"]}


def test_underscore_header_names_are_dropped_by_default(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backend = raw_backend(echo_http())
    headers = forwarded_names(portico(config_for(backend.url)).port)
    assert not [name for name in headers if "_" in name], headers
    assert headers["X-Forwarded-For"] == "127.0.0.1"


def test_allowed_underscore_names_never_shadow_forwarding_headers(
    raw_backend: RawBackendFactory, portico: PorticoFactory
) -> None:
    backend = raw_backend(echo_http())
    headers = forwarded_names(portico(config_for(backend.url, underscores_in_headers=True)).port)
    assert headers.get("My_Header") == "1"
    assert "X_Forwarded_For" not in headers and "X_Real_IP" not in headers
    assert headers["X-Forwarded-For"] == "127.0.0.1"
