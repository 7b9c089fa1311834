"""The WAF stage over real sockets: libmodsecurity with the OWASP CRS from Debian's
modsecurity-crs, in front of a real backend (the echo server, which reports what reached
it). Skipped, with the reason, when the binding or the rule set is missing
(scripts/test.sh installs both)."""

from __future__ import annotations

import copy
import hashlib
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_cli import portico_cmd
from tests.support.backends import RawBackend, echo_http, read_request
from tests.support.fleet import request
from tests.support.proxy import PorticoProcess
from tests.support.rawhttp import RawConnection
from tests.support.tomlwriter import dumps
from tests.support.waiting import wait_until

CRS = "/usr/share/modsecurity-crs/rules"
CRS_SETUP = "/etc/modsecurity/crs/crs-setup.conf"

try:
    import libmodsecurity  # noqa: F401

    _MISSING = ""
except ImportError:
    _MISSING = "libmodsecurity is not installed (pip install 'portico[waf]')"
if not _MISSING and not (os.path.isdir(CRS) and os.path.isfile(CRS_SETUP)):
    _MISSING = "the OWASP CRS is not installed (apt install modsecurity-crs)"

pytestmark = pytest.mark.skipif(bool(_MISSING), reason=_MISSING)

SQLI = "/search?id=1%27%20OR%20%271%27%3D%271"
FORM = [("Content-Type", "application/x-www-form-urlencoded")]
# A Host name, not 127.0.0.1: the CRS scores a numeric Host (920350) on every request.
HOST = [("Host", "shop.example.test"), ("User-Agent", "pytest"), ("Accept", "*/*")]


@pytest.fixture(scope="module")
def backend() -> Any:
    b = RawBackend(echo_http()).start()
    yield b
    b.stop()


def config(backend: RawBackend, waf: Any, **extra: Any) -> dict[str, Any]:
    return {
        "server": {"shutdown_grace": 0.5},
        "request_id": {"enabled": True},
        "upstreams": {"app": {"backends": [backend.url]}},
        "routes": [
            {"path": "/", "upstream": "app", "waf": waf, **extra},
            {"path": "/open", "upstream": "app"},
        ],
    }


def get(port: int, target: str) -> Any:
    return request(port, "GET", target, HOST)


def post(port: int, target: str, body: bytes, headers: list[tuple[str, str]] = FORM) -> Any:
    return request(port, "POST", target, [*HOST, *headers], body)


def logged(proxy: PorticoProcess, pattern: str) -> re.Match[str] | None:
    return re.search(pattern, proxy.output())


def test_sqli_in_query_is_403_with_request_id_and_logged_rules(
    portico: Any, backend: RawBackend
) -> None:
    proxy = portico(config(backend, {"enabled": True}))
    clean = get(proxy.port, "/search?id=42&q=blue+shoes")
    assert clean.status == 200, clean.body
    before = len(backend.received)
    resp = get(proxy.port, SQLI)
    assert resp.status == 403
    rid = resp.header("X-Request-Id")
    assert rid and rid.encode() in resp.body
    assert len(backend.received) == before  # nothing reached the app
    wait_until(lambda: logged(proxy, rf"waf blocked 403: GET .*request_id={rid}"), 5)
    line = logged(proxy, rf"waf blocked 403: .*request_id={rid} rules=([\d,]+)")
    assert line is not None
    rules = line.group(1).split(",")
    assert "942100" in rules and "949110" in rules  # libinjection SQLi, then the threshold
    # The same attack on a route without the WAF goes through: the stage is per route.
    assert get(proxy.port, "/open" + SQLI).status == 200


def test_acceptance_example_form_and_true_shorthand(portico: Any, backend: RawBackend) -> None:
    proxy = portico(config(backend, True))
    assert get(proxy.port, SQLI).status == 403
    assert get(proxy.port, "/index.html").status == 200


def test_disabled_waf_lets_everything_through(portico: Any, backend: RawBackend) -> None:
    proxy = portico(config(backend, {"enabled": False}))
    assert get(proxy.port, SQLI).status == 200


def test_detect_mode_passes_and_logs_what_it_would_block(
    portico: Any, backend: RawBackend
) -> None:
    proxy = portico(config(backend, {"mode": "detect"}))
    resp = get(proxy.port, SQLI)
    assert resp.status == 200
    assert resp.json()["target"] == SQLI  # the app got the request as sent
    rid = resp.header("X-Request-Id")
    wait_until(lambda: logged(proxy, rf"waf would block \(detect mode\): GET .*{rid}"), 5)
    assert logged(proxy, r"rules=[\d,]*942100")


def test_exclusions_per_route_and_per_path(portico: Any, backend: RawBackend) -> None:
    # XSS: matched by several 941 rules; the route switches them all off, so only what is
    # left could block. A per-path exclusion switches off the SQLi rules under /search only.
    waf = {
        "exclusions": [{"path": "/search", "rules": [942100]}],
        "exclude_rules": [941100, 941110, 941160],
    }
    proxy = portico(config(backend, waf))
    xss = "/page?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E"
    assert get(proxy.port, xss).status == 200  # route-wide removal
    assert get(proxy.port, SQLI).status == 200  # /search: 942100 off
    assert get(proxy.port, SQLI.replace("/search", "/other")).status == 403


def test_exclusion_limited_to_one_argument(portico: Any, backend: RawBackend) -> None:
    waf = {"exclusions": [{"path": "/", "rules": [942100], "args": ["comment"]}]}
    proxy = portico(config(backend, waf))
    attack = "1%27%20OR%20%271%27%3D%271"
    assert get(proxy.port, f"/post?comment={attack}").status == 200
    assert get(proxy.port, f"/post?id={attack}").status == 403


def test_form_body_sqli_is_blocked_and_clean_form_passes(
    portico: Any, backend: RawBackend
) -> None:
    proxy = portico(config(backend, {"enabled": True}))
    before = len(backend.received)
    bad = post(proxy.port, "/login", b"user=admin&pass=1%27+OR+%271%27%3D%271")
    assert bad.status == 403 and bad.header("X-Request-Id")
    assert len(backend.received) == before
    ok = post(proxy.port, "/login", b"user=admin&pass=correct+horse")
    assert ok.status == 200
    assert ok.json()["body_sha256"] == hashlib.sha256(b"user=admin&pass=correct+horse").hexdigest()
    # JSON bodies get ModSecurity's JSON parser.
    json_type = [("Content-Type", "application/json")]
    js = post(proxy.port, "/api", b'{"id": "1\' OR \'1\'=\'1"}', json_type)
    assert js.status == 403


def test_expect_continue_body_is_inspected(portico: Any, backend: RawBackend) -> None:
    proxy = portico(config(backend, {"enabled": True}))
    body = b"user=admin&pass=1%27+OR+%271%27%3D%271"
    head = [*HOST, *FORM, ("Expect", "100-continue"), ("Content-Length", str(len(body)))]
    with RawConnection(proxy.port) as conn:
        # As a client does: the head, wait for 100 Continue, then the body.
        lines = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in head)
        conn.send(b"POST /login HTTP/1.1\r\n" + lines + b"\r\n")
        assert conn.recv_response(timeout=5).status == 100
        conn.send(body)
        assert conn.recv_response(timeout=5).status == 403


def multipart(data: bytes, boundary: str = "portico-test-boundary") -> tuple[bytes, str]:
    body = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_large_clean_upload_streams_past_the_limit(portico: Any, backend: RawBackend) -> None:
    limit = 65536
    proxy = portico(config(backend, {"body_limit": limit}))
    body, ctype = multipart(os.urandom(4 * 1024 * 1024))
    resp = post(proxy.port, "/upload", body, [("Content-Type", ctype)])
    assert resp.status == 200, resp.body[:200]
    echoed = resp.json()
    assert echoed["body_length"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    # Chunked too: the kept bytes are replayed, the rest streams.
    step = 65536
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + step]), body[i : i + step])
        for i in range(0, len(body), step)
    )
    with RawConnection(proxy.port) as conn:
        resp = conn.request(
            "POST",
            "/upload",
            [*HOST, ("Content-Type", ctype), ("Transfer-Encoding", "chunked")],
            chunks + b"0\r\n\r\n",
        )
    assert resp.status == 200, resp.body[:200]
    assert resp.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_only_the_first_body_limit_bytes_are_inspected(portico: Any, backend: RawBackend) -> None:
    # Documented: an attack placed beyond body_limit is not seen (ProcessPartial).
    proxy = portico(config(backend, {"body_limit": 1024}))
    attack = b"&pass=1%27+OR+%271%27%3D%271"
    early = post(proxy.port, "/login", attack + b"&pad=" + b"a" * 4000)
    late = post(proxy.port, "/login", b"pad=" + b"a" * 4000 + attack)
    assert early.status == 403
    assert late.status == 200


def test_paranoia_level_changes_what_is_caught(portico: Any, backend: RawBackend) -> None:
    # 942430 (restricted SQL character anomaly: 12+ special characters) is paranoia level 2.
    target = "/q?x=" + "%27%28%29%3B" * 4
    pl1 = portico(config(backend, {"paranoia_level": 1}))
    pl2 = portico(config(backend, {"paranoia_level": 2}))
    assert get(pl1.port, target).status == 200
    assert get(pl2.port, target).status == 403


def test_threshold_decides_between_log_and_block(portico: Any, backend: RawBackend) -> None:
    # One critical match scores 5: blocked at the default threshold, logged at 100.
    lax = portico(config(backend, {"inbound_threshold": 100}))
    resp = get(lax.port, SQLI)
    assert resp.status == 200
    wait_until(lambda: logged(lax, r"waf matched below threshold: GET .*rules=[\d,]*942100"), 5)


# --- bad input: refused with the key path, by `portico check` and by a reload ----------------


def check(tmp_path: Path, waf: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "portico.toml"
    path.write_text(
        dumps(
            {
                "upstreams": {"app": {"backends": ["http://127.0.0.1:5001"]}},
                "routes": [{"path": "/", "upstream": "app", "waf": waf}],
            }
        )
    )
    return portico_cmd("check", path)


def test_check_accepts_the_acceptance_example(tmp_path: Path) -> None:
    path = tmp_path / "portico.toml"
    path.write_text(
        '[upstreams.app]\nbackends = ["http://127.0.0.1:5001"]\n\n'
        '[[routes]]\npath = "/"\nupstream = "app"\nwaf = { enabled = true }\n'
    )
    done = portico_cmd("check", path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_check_refuses_unreadable_rule_files(tmp_path: Path) -> None:
    done = check(tmp_path, {"rules": [str(tmp_path / "missing.conf")]})
    assert done.returncode == 1
    assert "routes[0].waf.rules[0]: cannot read" in done.stdout + done.stderr
    done = check(tmp_path, {"crs": str(tmp_path / "nowhere")})
    assert "routes[0].waf.crs:" in done.stdout + done.stderr


def test_check_refuses_a_rule_that_does_not_compile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text('SecRule ARGS "@rx (" "id:10001,phase:2,deny,nosuchaction"\n')
    done = check(tmp_path, {"rules": [str(bad)]})
    out = done.stdout + done.stderr
    assert done.returncode == 1
    assert "routes[0].waf.rules[0]:" in out and "bad.conf" in out
    done = check(tmp_path, {"directives": "SecRule ARGS @nosuchop x"})
    assert done.returncode == 1
    assert "routes[0].waf.directives:" in done.stdout + done.stderr


def test_a_reload_with_a_broken_rule_keeps_the_old_rules(
    portico: Any, backend: RawBackend, tmp_path: Path
) -> None:
    proxy = portico(config(backend, {"enabled": True}))
    data = copy.deepcopy(proxy.config)
    data["routes"][0]["waf"] = {"directives": "SecRule ARGS @nosuchop x", "crs": ""}
    proxy.config_path.write_text(dumps(data))
    proxy.process.signal(signal.SIGHUP)
    wait_until(lambda: logged(proxy, r"reload refused"), 10)
    assert logged(proxy, r"routes\[0\]\.waf\.directives")
    assert get(proxy.port, SQLI).status == 403  # the CRS still guards the route


def test_response_inspection_is_off_by_default_and_logs_when_on(
    portico: Any, raw_backend: Any
) -> None:
    # A backend that leaks an SQL error message: the CRS's response rules (951) know it.
    leak = (
        b"You have an error in your SQL syntax; check the manual that corresponds to your"
        b" MySQL server version"
    )

    async def handler(reader: Any, writer: Any) -> None:
        while (req := await read_request(reader)) is not None:
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
                % (len(leak), leak)
            )
            await writer.drain()
            if not req.keep_alive:
                return

    leaky = raw_backend(handler)
    off = portico(config(leaky, True))
    on = portico(config(leaky, {"inspect_response": True}))
    for proxy in (off, on):
        resp = get(proxy.port, "/report")
        assert resp.status == 200 and resp.body == leak  # logged only: the body goes out whole
    rid = get(on.port, "/report").header("X-Request-Id")
    wait_until(lambda: logged(on, rf"waf response .*\(logged only\): GET /report .*{rid}"), 5)
    assert logged(on, rf"request_id={rid} rules=[\d,]*951\d\d\d")
    assert not logged(off, r"waf response")


def test_every_worker_compiles_and_applies_the_rules(portico: Any, backend: RawBackend) -> None:
    proxy = portico(config(backend, True), workers=2)
    # Each request on a new connection: both workers take some of them.
    statuses = [get(proxy.port, SQLI).status for _ in range(8)]
    assert statuses == [403] * 8
    assert get(proxy.port, "/search?id=42").status == 200


def test_detect_mode_reads_the_body_and_forwards_it_whole(
    portico: Any, backend: RawBackend
) -> None:
    proxy = portico(config(backend, {"mode": "detect"}))
    body = b"user=admin&pass=1%27+OR+%271%27%3D%271"
    resp = post(proxy.port, "/login", body)
    assert resp.status == 200
    assert resp.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    rid = resp.header("X-Request-Id")
    wait_until(lambda: logged(proxy, rf"waf would block \(detect mode\): POST /login .*{rid}"), 5)


def test_the_waf_sees_the_client_path_before_a_rewrite(portico: Any, backend: RawBackend) -> None:
    # The exclusion names the path the client sent; strip_prefix runs after the WAF.
    waf = {"exclusions": [{"path": "/api/search", "rules": [942100]}]}
    cfg = config(backend, waf, strip_prefix="/api")
    cfg["routes"][0]["path"] = "/api"
    proxy = portico(cfg)
    resp = get(proxy.port, "/api" + SQLI)
    assert resp.status == 200
    assert resp.json()["target"] == SQLI  # the backend got the stripped path
    assert get(proxy.port, "/api" + SQLI.replace("/search", "/other")).status == 403
