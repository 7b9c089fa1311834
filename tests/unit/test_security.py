"""Pure parts of the security stages: CORS decisions, htpasswd kinds, basic credentials and
their cache, RFC 6750 challenges, and the configurations ``portico check`` refuses."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from portico.codec.events import RequestHead
from portico.config.htpasswd import HtpasswdError, parse_htpasswd
from portico.config.load import validate
from portico.errors import ConfigError
from portico.policy.cors import CorsPolicy
from portico.policy.credentials import VerifiedCache, check_password, parse_basic
from portico.runtime.cors import Cors, add_vary
from portico.runtime.request import RequestState
from portico.runtime.stageorder import stage_order
from portico.runtime.stages import LocalReply

# --- CORS policy ------------------------------------------------------------------------------


def policy(origins: list[str], credentials: bool = False, headers: list[str] | None = None) -> Any:
    return CorsPolicy(origins, ["GET", "PUT"], headers or ["Content-Type"], credentials, 60, [])


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        (b"https://app.example.test", True),
        (b"HTTPS://APP.EXAMPLE.TEST", True),
        (b"http://app.example.test", False),
        (b"https://app.example.test:8443", False),
        (b"https://a.shop.test", True),
        (b"https://x.y.shop.test", True),
        (b"https://shop.test", False),  # the bare domain is not a subdomain
        (b"https://evilshop.test", False),
        (b"https://a.shop.test.evil.test", False),
        (b"https://a.shop.test:444", False),
        (b"https://dev-7.preview.test", True),
        (b"https://dev-x.preview.test", False),
        (b"null", False),
        (b"https://" + b"a" * 2000 + b".shop.test", False),
    ],
)
def test_origin_matching(origin: bytes, ok: bool) -> None:
    p = policy([
        "https://app.example.test", "https://*.shop.test", r"~https://dev-\d+\.preview\.test",
    ])  # fmt: skip
    assert p.allowed(origin) is ok


def test_preflight_checks_method_and_headers() -> None:
    p = policy(["https://a.test"], credentials=True)
    ok = dict(p.preflight(b"https://a.test", b"PUT", b"content-type"))
    assert ok[b"Access-Control-Allow-Origin"] == b"https://a.test"
    assert ok[b"Access-Control-Allow-Credentials"] == b"true"
    assert ok[b"Access-Control-Allow-Headers"] == b"content-type"
    assert ok[b"Access-Control-Max-Age"] == b"60"
    assert p.preflight(b"https://a.test", b"DELETE", b"") is None
    assert p.preflight(b"https://a.test", b"PUT", b"x-secret") is None
    assert p.preflight(b"https://b.test", b"PUT", b"") is None
    star = policy(["*"], headers=["*"])
    assert dict(star.preflight(b"https://b.test", b"GET", b"x-any"))[
        b"Access-Control-Allow-Origin"
    ] == b"*"


def _req(method: bytes, headers: list[tuple[bytes, bytes]]) -> RequestState:
    head = RequestHead(
        method, b"/", b"1.1", headers, host=b"gw", keep_alive=True, framing="none",
        content_length=None, connection_tokens=frozenset(), expect_continue=False, upgrade=False,
    )
    return RequestState(head, b"/", b"gw", "127.0.0.1", False, b"http", 0.0)


def test_stage_answers_preflights_and_decorates_responses() -> None:
    from portico.config.security import Cors as CorsConfig

    stage = Cors(CorsConfig(origins=["https://a.test"], expose_headers=["X-Id"]))
    pre = stage.on_request(_req(b"OPTIONS", [
        (b"Origin", b"https://a.test"), (b"Access-Control-Request-Method", b"PUT"),
    ]))  # fmt: skip
    assert isinstance(pre, LocalReply) and pre.status == 204
    refused = stage.on_request(_req(b"OPTIONS", [
        (b"Origin", b"https://evil.test"), (b"Access-Control-Request-Method", b"PUT"),
    ]))  # fmt: skip
    assert isinstance(refused, LocalReply) and refused.status == 403
    assert not any(n.startswith(b"Access-Control") for n, _ in refused.headers)
    # A plain OPTIONS (no Access-Control-Request-Method) is not a preflight: it goes on.
    assert stage.on_request(_req(b"OPTIONS", [(b"Origin", b"https://a.test")])) is None
    headers = [(b"Vary", b"Accept-Encoding"), (b"Access-Control-Allow-Origin", b"*")]
    stage.on_response(_req(b"GET", [(b"Origin", b"https://a.test")]), 200, headers)
    assert headers == [
        (b"Vary", b"Accept-Encoding, Origin"),
        (b"Access-Control-Allow-Origin", b"https://a.test"),
        (b"Access-Control-Expose-Headers", b"X-Id"),
    ]
    # A disallowed origin: no CORS headers at all (the upstream's are removed), Vary kept.
    headers = [(b"Access-Control-Allow-Origin", b"*")]
    stage.on_response(_req(b"GET", [(b"Origin", b"https://evil.test")]), 200, headers)
    assert headers == [(b"Vary", b"Origin")]


def test_add_vary_merges_once() -> None:
    h = [(b"Vary", b"origin")]
    add_vary(h, b"Origin")
    assert h == [(b"Vary", b"origin")]
    h = [(b"Vary", b"*")]
    add_vary(h, b"Origin")
    assert h == [(b"Vary", b"*")]


# --- htpasswd and credentials -----------------------------------------------------------------


def test_htpasswd_kinds() -> None:
    good = bcrypt.hashpw(b"pw", bcrypt.gensalt(4))
    users = parse_htpasswd(b"# comment\n\nalice:" + good + b"\nbob:$argon2id$v=19$m=65536,t=3,"
                           b"p=4$c2FsdHNhbHQ$aGFzaGhhc2g\n")
    assert set(users) == {b"alice", b"bob"}
    for line, why in [
        (b"u:$apr1$x$y", "Apache MD5"),
        (b"u:{SHA}abc=", "SHA-1"),
        (b"u:abcdefghijklm", "DES crypt"),
        (b"u:hunter2", "plaintext"),
        (b"u:$6$salt$hash", "SHA-512-crypt"),
        (b"nocolon", "not user:hash"),
    ]:
        with pytest.raises(HtpasswdError, match=why):
            parse_htpasswd(b"alice:" + good + b"\n" + line + b"\n")
    with pytest.raises(HtpasswdError, match="line 2: user 'alice' appears twice"):
        parse_htpasswd(b"alice:" + good + b"\nalice:" + good + b"\n")


def test_parse_basic_and_cache() -> None:
    value = b"Basic " + base64.b64encode(b"alice:p:w")
    assert parse_basic(value) == (b"alice", b"p:w")
    assert parse_basic(b"basic " + base64.b64encode(b"alice:")) == (b"alice", b"")
    assert parse_basic(b"Bearer x") is None
    assert parse_basic(b"Basic ###") is None
    assert parse_basic(b"Basic " + base64.b64encode(b"nocolon")) is None
    assert parse_basic(b"Basic " + b"A" * 2000) is None
    # A user name goes upstream in user_header: no header injection through it.
    assert parse_basic(b"Basic " + base64.b64encode(b"a\r\nX-Admin: 1:pw")) is None
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4))
    assert check_password("bcrypt", hashed, b"pw")
    assert not check_password("bcrypt", hashed, b"px")
    cache = VerifiedCache()
    d = cache.digest(b"alice", b"pw")
    assert d != cache.digest(b"alic", b"epw")  # the separator keeps pairs apart
    assert b"pw" not in d
    cache.remember(d, 1, now=0.0)
    assert cache.hit(d, 1, now=10.0)
    assert not cache.hit(d, 2, now=10.0)  # the file changed: check again
    cache.remember(d, 1, now=0.0)
    assert not cache.hit(d, 1, now=1000.0)  # expired


# --- configurations refused -------------------------------------------------------------------


def _config(tmp_path: Path, *routes: dict[str, Any]) -> dict[str, Any]:
    return {"upstreams": {"app": {"backends": ["http://127.0.0.1:5001"]}}, "routes": list(routes)}


@pytest.fixture
def htpasswd(tmp_path: Path) -> str:
    p = tmp_path / "htpasswd"
    p.write_bytes(b"u:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) + b"\n")
    return str(p)


def problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        config = validate(data)
    except ConfigError as e:
        return list(e.problems)
    return stage_order(config)


def test_acceptance_example_auth_and_cors_keys(tmp_path: Path, htpasswd: str) -> None:
    route: dict[str, Any] = {
        "path": "/", "upstream": "app", "auth": {"basic": {"htpasswd": htpasswd}},
        "cors": {"origins": ["https://app.example.test"], "credentials": True},
    }  # fmt: skip
    assert problems(_config(tmp_path, route)) == []


@pytest.mark.parametrize(
    ("auth", "path", "reason"),
    [
        ({"jwt": {"algorithms": ["none"], "jwks_url": "https://idp.test/k"}},
         "routes[0].auth.jwt.algorithms", "'none' is refused"),
        ({"jwt": {"algorithms": ["RS256"], "jwks_url": "http://idp.test/k"}},
         "routes[0].auth.jwt.jwks_url", "use https"),
        ({"jwt": {"algorithms": ["HS256"], "jwks_url": "https://idp.test/k"}},
         "routes[0].auth.jwt.algorithms", "HS256 needs secret_file"),
        ({"jwt": {"algorithms": ["RS256"]}}, "routes[0].auth.jwt", "give exactly one of"),
        ({"jwt": {"algorithms": ["RS256"], "jwks_url": "https://idp.test/k"},
          "forward": {"url": "http://127.0.0.1:1/a"}},
         "routes[0].auth", "give exactly one of basic, jwt or forward"),
    ],
)
def test_auth_refusals(tmp_path: Path, auth: dict[str, Any], path: str, reason: str) -> None:
    found = problems(_config(tmp_path, {"upstream": "app", "auth": auth}))
    assert any(p == path and reason in r for p, r in found), found


@pytest.mark.parametrize(
    ("auth", "path"),
    [
        ({"forward": {"url": "http://127.0.0.1:1/a", "response_headers": ["Transfer-Encoding"]}},
         "routes[0].auth.forward.response_headers"),
        ({"jwt": {"algorithms": ["RS256"], "jwks_url": "https://i.test/k",
                  "forward_claims": {"Content-Length": "sub"}}},
         "routes[0].auth.jwt.forward_claims"),
        ({"jwt": {"algorithms": ["RS256"], "jwks_url": "https://i.test/k",
                  "forward_claims": {"X-Forwarded-For": "sub"}}},
         "routes[0].auth.jwt.forward_claims"),
    ],
)
def test_auth_may_not_write_framing_or_forwarding_headers(
    tmp_path: Path, auth: dict[str, Any], path: str
) -> None:
    found = problems(_config(tmp_path, {"upstream": "app", "auth": auth}))
    assert len(found) == 1 and found[0][0].startswith(path), found
    assert "managed by Portico" in found[0][1]


def test_short_hmac_secret_and_bad_key_file_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"tooshort")
    found = problems(_config(tmp_path, {"upstream": "app", "auth": {"jwt": {
        "algorithms": ["HS256"], "secret_file": str(short)}}}))  # fmt: skip
    assert any("at least 32 bytes" in r for _, r in found), found
    found = problems(_config(tmp_path, {"upstream": "app", "auth": {"jwt": {
        "algorithms": ["RS256"], "key_file": str(short)}}}))  # fmt: skip
    assert any("not a PEM public key" in r for _, r in found), found


def test_cors_refusals(tmp_path: Path) -> None:
    found = problems(_config(tmp_path, {"upstream": "app", "cors": {
        "origins": ["*"], "credentials": True}}))  # fmt: skip
    assert found and found[0][0] == "routes[0].cors.origins" and "credentials" in found[0][1]
    found = problems(_config(tmp_path, {"upstream": "app", "cors": {
        "origins": ["https://a.test/path"]}}))  # fmt: skip
    assert found and "is not an origin" in found[0][1]
    found = problems(_config(tmp_path, {"upstream": "app", "methods": ["GET"], "cors": {
        "origins": ["https://a.test"]}}))  # fmt: skip
    assert found == [("routes[0].cors", found[0][1])] and "OPTIONS" in found[0][1]


def test_order_refuses_an_open_route_in_front_of_auth(tmp_path: Path, htpasswd: str) -> None:
    auth = {"basic": {"htpasswd": htpasswd}}
    # The usual workaround elsewhere: an OPTIONS route without auth, to the same upstream.
    found = problems(_config(
        tmp_path,
        {"path": "/api", "methods": ["OPTIONS"], "upstream": "app"},
        {"path": "/api", "upstream": "app", "auth": auth},
    ))
    assert len(found) == 1 and found[0][0] == "routes[0]"
    assert "OPTIONS requests of routes[1]" in found[0][1] and "set cors" in found[0][1]
    # A route that shadows the authenticated one entirely.
    found = problems(_config(
        tmp_path,
        {"path": "/", "upstream": "app", "priority": 5},
        {"path": "/admin", "upstream": "app", "auth": auth},
    ))
    assert found and found[0][0] == "routes[1].auth" and "never runs" in found[0][1]
    # Allowed: a more specific open route (it only takes its own paths), an OPTIONS route
    # that only answers, and the gateway's own CORS on the authenticated route.
    assert problems(_config(
        tmp_path,
        {"path": "/api/public", "upstream": "app"},
        {"path": "/api", "methods": ["OPTIONS"], "respond": {"status": 204}},
        {"path": "/api", "upstream": "app", "auth": auth, "cors": {"origins": ["https://a.t"]}},
    )) == []
