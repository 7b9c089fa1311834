"""Authentication stages over real sockets: basic auth from an htpasswd file (bcrypt and
argon2, reloaded when it changes), JWT with key files and a JWKS server that rotates keys,
hostile tokens, and forward auth against a real Flask auth service under gunicorn."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import jwt
import pytest
from argon2 import PasswordHasher
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.support.authservice import AuthService
from tests.support.backends import GunicornFlask
from tests.support.ports import free_port
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def app() -> Iterator[GunicornFlask]:
    with GunicornFlask("app", worker_class="gthread") as backend:
        yield backend


def config(app: GunicornFlask, **route: Any) -> dict[str, Any]:
    return {
        "server": {"shutdown_grace": 0.5},
        "upstreams": {"app": {"backends": [app.url]}},
        "routes": [{"path": "/", "upstream": "app", **route}],
    }


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# --- basic ------------------------------------------------------------------------------------


def write_htpasswd(path: Path, entries: dict[str, bytes]) -> None:
    path.write_bytes(b"".join(u.encode() + b":" + h + b"\n" for u, h in entries.items()))


def test_basic_bcrypt_and_argon2_accept_refuse_and_follow_file_changes(
    portico: Any, app: GunicornFlask, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, {
        "alice": bcrypt.hashpw(b"wonderland", bcrypt.gensalt(10)),
        "bob": PasswordHasher().hash("builder").encode(),
    })  # fmt: skip
    proxy = portico(config(app, auth={"basic": {
        "htpasswd": str(htpasswd), "realm": "Staff", "user_header": "X-User",
    }}))  # fmt: skip
    url = f"http://127.0.0.1:{proxy.port}/echo"
    with httpx.Client(timeout=10) as client:
        none = client.get(url)
        assert none.status_code == 401
        assert none.headers["www-authenticate"] == 'Basic realm="Staff", charset="UTF-8"'
        ok = client.get(url, headers={**basic("alice", "wonderland"), "X-User": "mallory"})
        assert ok.status_code == 200
        # The gateway names the user; the client's own X-User never arrives.
        assert ok.json()["headers"]["X-User"] == "alice"
        assert client.get(url, headers=basic("bob", "builder")).status_code == 200
        assert client.get(url, headers=basic("alice", "wrong")).status_code == 401
        assert client.get(url, headers=basic("nobody", "x")).status_code == 401
        assert client.get(url, headers={"Authorization": "Basic !!!"}).status_code == 401
        # The second good login is answered from the verified cache: far under a bcrypt check.
        t0 = time.perf_counter()
        for _ in range(20):
            assert client.get(url, headers=basic("alice", "wonderland")).status_code == 200
        per_request = (time.perf_counter() - t0) / 20
        assert per_request < 0.04, per_request
        # A new file: bob is gone, carol arrives; seen within the 1 s stat interval.
        write_htpasswd(htpasswd, {
            "alice": bcrypt.hashpw(b"wonderland", bcrypt.gensalt(10)),
            "carol": bcrypt.hashpw(b"c4rol", bcrypt.gensalt(10)),
        })  # fmt: skip
        os.utime(htpasswd, ns=(time.time_ns(), time.time_ns() + 10**9))
        wait_until(
            lambda: client.get(url, headers=basic("carol", "c4rol")).status_code == 200, 5,
            message="carol accepted after the file changed",
        )
        assert client.get(url, headers=basic("bob", "builder")).status_code == 401
        # A bad new file (a plaintext entry) is not taken: the users before it stay.
        htpasswd.write_bytes(b"eve:plaintext\n")
        time.sleep(1.2)  # past the stat interval; nothing to wait for: nothing may change
        assert client.get(url, headers=basic("carol", "c4rol")).status_code == 200
        assert client.get(url, headers=basic("eve", "plaintext")).status_code == 401


def test_slow_hashes_do_not_stall_other_requests(
    portico: Any, app: GunicornFlask, tmp_path: Path
) -> None:
    # Cost 14: a second or more per check here. While such checks run (on a thread), a route
    # without auth answers at once: the event loop is not the one hashing.
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(14))
    write_htpasswd(htpasswd, {"slow": hashed})
    t0 = time.perf_counter()
    bcrypt.checkpw(b"pw", hashed)
    one_check = time.perf_counter() - t0
    cfg = config(app, path="/echo", auth={"basic": {"htpasswd": str(htpasswd)}})
    cfg["routes"].append({"path": "/health", "upstream": "app"})
    proxy = portico(cfg)
    base = f"http://127.0.0.1:{proxy.port}"
    results: list[int] = []

    def login(password: str) -> None:
        results.append(httpx.get(f"{base}/echo", headers=basic("slow", password), timeout=30)
                       .status_code)

    threads = [threading.Thread(target=login, args=(p,)) for p in ("pw", "bad", "pw2")]
    for t in threads:
        t.start()
    time.sleep(0.2)  # the checks are under way (nothing observable to wait on from outside)
    t0 = time.perf_counter()
    health = httpx.get(f"{base}/health", timeout=10).status_code
    waited = time.perf_counter() - t0
    for t in threads:
        t.join(30)
    assert health == 200
    # Queued behind the checks on the loop, it would wait for several of them.
    assert waited < one_check / 3, (waited, one_check)
    assert sorted(results) == [200, 401, 401]


def test_check_refuses_weak_htpasswd_entries(tmp_path: Path) -> None:
    from tests.integration.test_cli import portico_cmd

    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(
        b"ok:" + bcrypt.hashpw(b"x", bcrypt.gensalt(4)) + b"\nold:$apr1$salt$hash\n"
    )
    cfg = tmp_path / "portico.toml"
    cfg.write_text(
        '[upstreams.app]\nbackends = ["http://127.0.0.1:5001"]\n[[routes]]\nupstream = "app"\n'
        f'auth = {{ basic = {{ htpasswd = "{htpasswd}" }} }}\n'
    )
    out = portico_cmd("check", str(cfg))
    assert out.returncode == 1
    assert "routes[0].auth.basic.htpasswd:" in out.stdout + out.stderr
    assert "line 2 (user 'old'): Apache MD5" in out.stdout + out.stderr


# --- JWT ------------------------------------------------------------------------------------


def pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("alg", ["HS256", "ES256", "EdDSA"])
def test_jwt_key_file_each_algorithm(
    portico: Any, app: GunicornFlask, tmp_path: Path, alg: str
) -> None:
    keyfile = tmp_path / "key"
    signing: Any
    if alg == "HS256":
        signing = os.urandom(32).hex().encode()
        keyfile.write_bytes(signing)
        other: Any = os.urandom(32).hex().encode()
    elif alg == "ES256":
        signing, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
            ec.SECP256R1()
        )
        keyfile.write_bytes(pem_public(signing))
    else:
        signing, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
        keyfile.write_bytes(pem_public(signing))
    source = "secret_file" if alg == "HS256" else "key_file"
    proxy = portico(config(app, auth={"jwt": {
        "algorithms": [alg], source: str(keyfile), "issuer": "https://idp.test",
        "audience": "portico", "forward_claims": {"X-Sub": "sub"},
    }}))  # fmt: skip
    url = f"http://127.0.0.1:{proxy.port}/echo"
    now = int(time.time())
    claims = {"sub": "alice", "iss": "https://idp.test", "aud": "portico", "exp": now + 60}
    good = jwt.encode(claims, signing, algorithm=alg)
    resp = httpx.get(url, headers={"Authorization": f"Bearer {good}", "X-Sub": "root"})
    assert resp.status_code == 200
    assert resp.json()["headers"]["X-Sub"] == "alice"
    forged = jwt.encode(claims, other, algorithm=alg)
    bad = httpx.get(url, headers={"Authorization": f"Bearer {forged}"})
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]
    # A verified token is remembered, but never past its exp: the same token, asked again
    # and again, turns to 401 when it expires.
    brief = jwt.encode({**claims, "exp": int(time.time()) + 2}, signing, algorithm=alg)
    with httpx.Client(timeout=5, headers={"Authorization": f"Bearer {brief}"}) as client:
        assert client.get(url).status_code == 200
        assert client.get(url).json()["headers"]["X-Sub"] == "alice"  # from the cache too
        wait_until(lambda: client.get(url).status_code == 401, 6, message="expired token refused")


@pytest.fixture
def rsa_setup(tmp_path: Path) -> tuple[Any, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keyfile = tmp_path / "pub.pem"
    keyfile.write_bytes(pem_public(key))
    return key, keyfile


def test_jwt_claims_leeway_cookie_and_rfc6750_errors(
    portico: Any, app: GunicornFlask, rsa_setup: tuple[Any, Path]
) -> None:
    key, keyfile = rsa_setup
    proxy = portico(config(app, auth={"jwt": {
        "algorithms": ["RS256"], "key_file": str(keyfile), "issuer": "https://idp.test",
        "audience": "portico", "required_claims": ["exp", "sub"], "claims": {"role": "admin"},
        "leeway": 30, "cookie": "session", "realm": "api",
    }}))  # fmt: skip
    url = f"http://127.0.0.1:{proxy.port}/echo"
    now = int(time.time())
    base = {"sub": "a", "iss": "https://idp.test", "aud": "portico", "role": "admin"}

    def call(claims: dict[str, Any], cookie: bool = False) -> httpx.Response:
        token = jwt.encode(claims, key, algorithm="RS256")
        if cookie:
            return httpx.get(url, cookies={"session": token})
        return httpx.get(url, headers={"Authorization": f"Bearer {token}"})

    assert call({**base, "exp": now + 60}).status_code == 200
    assert call({**base, "exp": now + 60}, cookie=True).status_code == 200
    # Expired 10 s ago: within the 30 s leeway. 100 s ago: refused, and says why.
    assert call({**base, "exp": now - 10}).status_code == 200
    expired = call({**base, "exp": now - 100})
    assert expired.status_code == 401
    assert expired.headers["www-authenticate"] == (
        'Bearer realm="api", error="invalid_token", error_description="token expired"'
    )
    assert call({**base, "exp": now + 60, "iss": "https://evil.test"}).status_code == 401
    assert call({**base, "exp": now + 60, "aud": "other"}).status_code == 401
    assert call({k: v for k, v in base.items() if k != "sub"} | {"exp": now + 60}).status_code \
        == 401
    assert call({**base, "exp": now + 60, "nbf": now + 120}).status_code == 401
    # A valid token without the required role: 403 insufficient_scope (RFC 6750 3.1).
    scope = call({**base, "role": "user", "exp": now + 60})
    assert scope.status_code == 403
    assert 'error="insufficient_scope"' in scope.headers["www-authenticate"]
    # No token at all: a bare challenge, no error code (RFC 6750 3.1).
    bare = httpx.get(url)
    assert bare.status_code == 401
    assert bare.headers["www-authenticate"] == 'Bearer realm="api"'


def test_hostile_tokens_get_401_quickly(
    portico: Any, app: GunicornFlask, rsa_setup: tuple[Any, Path], tmp_path: Path
) -> None:
    key, keyfile = rsa_setup
    proxy = portico(config(app, auth={"jwt": {
        "algorithms": ["RS256"], "key_file": str(keyfile), "max_token_bytes": 4096,
    }}))  # fmt: skip
    url = f"http://127.0.0.1:{proxy.port}/echo"
    now = int(time.time())
    # Algorithm confusion: HS256 with the server's public key as the HMAC secret (PyJWT
    # itself refuses to make one, so by hand).
    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(
        json.dumps({"sub": "x", "exp": now + 60}).encode()
    )
    mac = hmac.new(keyfile.read_bytes(), signing_input.encode(), hashlib.sha256).digest()
    hs_confusion = signing_input + "." + b64(mac)
    segments = [b64(b'{"alg":"none","typ":"JWT"}'), b64(b'{"sub":"root"}')]
    hostile = [
        ".".join(segments) + ".",  # alg none, no signature
        hs_confusion,  # HMAC with an empty secret: the algorithm is not on the list
        "a" * 5000,  # over the size cap
        "x.y.z",  # not base64 JSON
        "e30." * 500,  # many segments
        b64(b'{"alg":"RS256","kid":' + b"[" * 1400 + b"]" * 1400 + b"}")
        + ".e30.sig",  # deeply nested JSON in the header, under the cap
        jwt.encode({"sub": "x", "exp": now + 60}, key, algorithm="RS256")[:-10] + "A" * 10,
        "\u00e9t\u00e9",  # not ASCII
    ]
    t0 = time.perf_counter()
    for token in hostile:
        resp = httpx.get(url, headers={"Authorization": b"Bearer " + token.encode()})
        assert resp.status_code == 401, token[:50]
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, elapsed
    # And the worker is still fine.
    good = jwt.encode({"sub": "x", "exp": now + 60}, key, algorithm="RS256")
    assert httpx.get(url, headers={"Authorization": f"Bearer {good}"}).status_code == 200


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class JwksServer:
    """A real JWKS endpoint on loopback whose key set the test rotates; counts fetches."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.doc = b'{"keys": []}'
        self.fetches = 0
        self.scheme = "https" if tls else "http"
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.doc)))
                self.end_headers()
                self.wfile.write(outer.doc)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def publish(self, *keys: tuple[str, Any]) -> None:
        jwks = []
        for kid, key in keys:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            jwks.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        self.doc = json.dumps({"keys": jwks}).encode()

    def __enter__(self) -> JwksServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_jwks_rotation_with_bounded_refresh(portico: Any, app: GunicornFlask) -> None:
    k1 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with JwksServer() as idp:
        idp.publish(("k1", k1))
        proxy = portico(config(app, auth={"jwt": {
            "algorithms": ["RS256"], "jwks_url": idp.url, "jwks_cache": 300,
            "jwks_min_refresh": 1,
        }}))  # fmt: skip
        url = f"http://127.0.0.1:{proxy.port}/echo"
        exp = int(time.time()) + 300

        def call(key: Any, kid: str) -> int:
            token = jwt.encode({"sub": "a", "exp": exp}, key, algorithm="RS256",
                               headers={"kid": kid})
            return httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code

        assert call(k1, "k1") == 200  # first use fetches the set
        assert idp.fetches == 1
        for _ in range(10):
            assert call(k1, "k1") == 200
        assert idp.fetches == 1  # cached
        # The IdP rotates: k2 appears. A token naming k2 makes one fetch, and is accepted.
        idp.publish(("k1", k1), ("k2", k2))
        wait_until(lambda: call(k2, "k2") == 200, 5, message="k2 accepted after rotation")
        fetched = idp.fetches
        assert fetched == 2
        # A flood of made-up kids: refused, and at most one fetch per jwks_min_refresh.
        t0 = time.monotonic()
        for i in range(50):
            assert call(k1, f"unknown-{i}") == 401
        elapsed = time.monotonic() - t0
        assert idp.fetches - fetched <= 1 + int(elapsed / 1.0), (idp.fetches, elapsed)
        # k1 retired: after the next refresh its tokens no longer pass; k2's do.
        idp.publish(("k2", k2))
        time.sleep(1.1)  # past jwks_min_refresh: an unknown kid may fetch again
        assert call(k2, "k3") == 401  # triggers the refresh
        assert call(k1, "k1") == 401
        assert call(k2, "k2") == 200


def test_jwks_server_down_fails_closed(portico: Any, app: GunicornFlask) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    proxy = portico(config(app, auth={"jwt": {
        "algorithms": ["RS256"], "jwks_url": f"http://127.0.0.1:{free_port()}/jwks",
        "jwks_timeout": 1,
    }}))  # fmt: skip
    token = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, key, algorithm="RS256",
                       headers={"kid": "k"})
    url = f"http://127.0.0.1:{proxy.port}/echo"
    auth = {"Authorization": f"Bearer {token}"}
    resp = httpx.get(url, headers=auth, timeout=10)
    assert resp.status_code == 503
    # Within jwks_min_refresh (10 s) the next ones do not try again: 503 at once.
    with httpx.Client(timeout=10) as client:
        for _ in range(20):
            t0 = time.perf_counter()
            assert client.get(url, headers=auth).status_code == 503
            assert time.perf_counter() - t0 < 0.5  # not the 1 s jwks_timeout of a fetch
    assert "jwks" in proxy.output()  # the failed fetch is logged, once
    assert proxy.output().count("failed") == 1, proxy.output()


# --- forward auth ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_service() -> Iterator[AuthService]:
    with AuthService() as svc:
        yield svc


def test_forward_auth_allows_refuses_and_copies_headers(
    portico: Any, app: GunicornFlask, auth_service: AuthService
) -> None:
    proxy = portico(config(app, auth={"forward": {
        "url": auth_service.url, "request_headers": ["Authorization", "Cookie"],
        "response_headers": ["X-Auth-User", "X-Auth-Saw"], "timeout": 1,
    }}))  # fmt: skip
    url = f"http://127.0.0.1:{proxy.port}/echo?x=1"
    ok = httpx.post(url, headers={
        "Authorization": "Bearer good", "Cookie": "a=b", "X-Other": "not sent",
        "X-Auth-User": "forged",
    }, content=b"body")  # fmt: skip
    assert ok.status_code == 200
    seen = ok.json()
    assert seen["headers"]["X-Auth-User"] == "alice"  # the service's, not the client's
    assert seen["body_length"] == 4
    method, fwd_method, uri, host, cookie, other = seen["headers"]["X-Auth-Saw"].split(" | ")
    assert (method, fwd_method, uri, cookie, other) == ("POST", "POST", "/echo?x=1", "a=b", "-")
    assert host == f"127.0.0.1:{proxy.port}"
    assert "X-Auth-Secret" not in seen["headers"]
    denied = httpx.get(url, headers={"Authorization": "Bearer nope"})
    assert denied.status_code == 401
    assert denied.text == "denied by the auth service\n"
    assert denied.headers["www-authenticate"] == 'Bearer realm="svc"'
    login = httpx.get(url, headers={"Authorization": "Bearer login"})
    assert login.status_code == 302
    assert login.headers["location"] == "https://login.example.test/?rd=/echo?x=1"
    assert login.headers["set-cookie"] == "state=xyz; Path=/"
    t0 = time.perf_counter()
    slow = httpx.get(url, headers={"Authorization": "Bearer slow"}, timeout=10)
    assert slow.status_code == 503
    assert 0.9 < time.perf_counter() - t0 < 2.5


def test_forward_auth_service_down_fails_closed(portico: Any, app: GunicornFlask) -> None:
    proxy = portico(config(app, auth={"forward": {
        "url": f"http://127.0.0.1:{free_port()}/auth", "timeout": 1,
    }}))  # fmt: skip
    resp = httpx.get(f"http://127.0.0.1:{proxy.port}/echo", headers={"Authorization": "x"})
    assert resp.status_code == 503


# --- the acceptance example ---------------------------------------------------------


def test_acceptance_example_checks_and_behaves(
    portico: Any, app: GunicornFlask, tmp_path: Path
) -> None:
    """The issue's example, whole: basic auth, the CRS, CORS for one origin."""
    from tests.integration.test_cli import portico_cmd
    from tests.integration.test_waf import _MISSING as WAF_MISSING

    if WAF_MISSING:
        pytest.skip(WAF_MISSING)
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, {"alice": bcrypt.hashpw(b"wonderland", bcrypt.gensalt(10))})
    text = (
        f'[upstreams.app]\nbackends = ["{app.url}"]\n\n[[routes]]\npath = "/"\nupstream = "app"\n'
        f'auth = {{ basic = {{ htpasswd = "{htpasswd}" }} }}\nwaf = {{ enabled = true }}\n'
        'cors = { origins = ["https://app.example.test"], credentials = true }\n'
    )
    cfg = tmp_path / "portico.toml"
    cfg.write_text(text)
    out = portico_cmd("check", cfg)
    assert out.returncode == 0, out.stdout + out.stderr
    proxy = portico(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nshutdown_grace = 0.5\n'
                    + text)
    url = f"http://127.0.0.1:{proxy.port}/echo"
    origin = {"Origin": "https://app.example.test"}
    alice = basic("alice", "wonderland")
    pre = httpx.options(url, headers={**origin, "Access-Control-Request-Method": "GET",
                                      "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 204  # before basic auth, which a preflight never passes
    assert pre.headers["access-control-allow-origin"] == "https://app.example.test"
    assert pre.headers["access-control-allow-credentials"] == "true"
    refused = httpx.get(url, headers=origin)
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://app.example.test"
    ok = httpx.get(url, headers={**origin, **alice})
    assert ok.status_code == 200
    assert ok.headers["vary"].endswith("Origin")
    other = httpx.get(url, headers={"Origin": "https://evil.test", **alice})
    assert other.status_code == 200
    assert not any(k.startswith("access-control") for k in other.headers)
    # An SQL injection in the query: 403 from the CRS for an authenticated client; an
    # unauthenticated one never reaches the WAF (401 from auth, first).
    sqli = url + "?id=1%27%20OR%20%271%27%3D%271"
    assert httpx.get(sqli, headers=alice).status_code == 403
    assert httpx.get(sqli).status_code == 401


def test_workers_authenticate_and_a_reload_opening_a_hole_is_refused(
    portico: Any, app: GunicornFlask, tmp_path: Path
) -> None:
    import copy
    import signal

    from tests.support.fleet import wait_for_log
    from tests.support.tomlwriter import dumps

    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, {"alice": bcrypt.hashpw(b"wonderland", bcrypt.gensalt(10))})
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with JwksServer() as idp:
        idp.publish(("k1", key))
        cfg = config(app, path="/api", auth={"basic": {"htpasswd": str(htpasswd)}})
        cfg["routes"].append({"path": "/jwt", "upstream": "app", "strip_prefix": "/jwt",
                              "auth": {"jwt": {"algorithms": ["RS256"], "jwks_url": idp.url}}})
        proxy = portico(cfg, workers=2)
        base = f"http://127.0.0.1:{proxy.port}"
        token = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, key, algorithm="RS256",
                           headers={"kid": "k1"})
        # Fresh connections land on either worker: each has its own thread pool and fetcher.
        for _ in range(8):
            assert httpx.get(f"{base}/api", headers=basic("alice", "wonderland")).status_code \
                != 401
            assert httpx.get(f"{base}/api").status_code == 401
            assert httpx.get(f"{base}/jwt/echo",
                             headers={"Authorization": f"Bearer {token}"}).status_code == 200
        # A reload adding an OPTIONS route without auth in front of /api is refused.
        data = copy.deepcopy(proxy.config)
        data["routes"].insert(0, {"path": "/api", "methods": ["OPTIONS"], "upstream": "app"})
        proxy.config_path.write_text(dumps(data))
        proxy.process.signal(signal.SIGHUP)
        [line] = wait_for_log(proxy, "reload refused", timeout=10)
        assert "takes the OPTIONS requests of routes[1]" in line
        assert httpx.options(f"{base}/api").status_code == 401


def test_concurrent_logins_with_the_same_credentials_share_one_check(
    portico: Any, app: GunicornFlask, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(13))
    write_htpasswd(htpasswd, {"u": hashed})
    t0 = time.perf_counter()
    bcrypt.checkpw(b"pw", hashed)
    one_check = time.perf_counter() - t0
    proxy = portico(config(app, auth={"basic": {"htpasswd": str(htpasswd)}}))
    url = f"http://127.0.0.1:{proxy.port}/echo"
    statuses: list[int] = []

    def login() -> None:
        statuses.append(httpx.get(url, headers=basic("u", "pw"), timeout=30).status_code)

    threads = [threading.Thread(target=login) for _ in range(6)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.perf_counter() - t0
    assert statuses == [200] * 6
    # Six separate checks on the one hash thread would take six checks' time; shared, one.
    # The bound sits halfway (3.5) so a loaded machine's noise in either measurement (the
    # reference check here, the shared one in Portico) cannot flip the verdict.
    assert elapsed < 3.5 * one_check, (elapsed, one_check)


def test_stage_order_ip_rules_cors_rate_limit_auth(
    portico: Any, app: GunicornFlask, tmp_path: Path
) -> None:
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd, {"u": bcrypt.hashpw(b"pw", bcrypt.gensalt(4))})
    cfg = config(app, path="/open", strip_prefix="/open",
                 auth={"basic": {"htpasswd": str(htpasswd)}},
                 cors={"origins": ["https://a.test"]},
                 rate_limit={"rate": 1, "per": "minute", "burst": 1, "headers": False})
    cfg["routes"].append({"path": "/closed", "upstream": "app", "ip_deny": ["127.0.0.0/8"],
                          "cors": {"origins": ["https://a.test"]},
                          "auth": {"basic": {"htpasswd": str(htpasswd)}}})
    proxy = portico(cfg)
    base = f"http://127.0.0.1:{proxy.port}"
    preflight = {"Origin": "https://a.test", "Access-Control-Request-Method": "GET"}
    # IP rules first: a denied client's preflight is refused before CORS answers it.
    assert httpx.options(f"{base}/closed", headers=preflight).status_code == 403
    # CORS before rate limits and auth: preflights are neither counted nor challenged.
    for _ in range(3):
        assert httpx.options(f"{base}/open", headers=preflight).status_code == 204
    # Rate limit before auth: the second request is refused by the limit (429) whatever
    # its credentials, so guessing passwords costs no hash past the limit.
    assert httpx.get(f"{base}/open/echo", headers=basic("u", "pw")).status_code == 200
    assert httpx.get(f"{base}/open/echo", headers=basic("u", "bad")).status_code == 429


def make_ca(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A private CA (its PEM at the returned path) and a server context for 127.0.0.1."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portico test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_path = tmp_path / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain = tmp_path / "server.pem"
    chain.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return ca_path, context


def test_jwks_over_https_checks_the_certificate(
    portico: Any, app: GunicornFlask, tmp_path: Path
) -> None:
    ca_path, tls = make_ca(tmp_path)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, key, algorithm="RS256",
                       headers={"kid": "k1"})
    auth = {"Authorization": f"Bearer {token}"}
    with JwksServer(tls) as idp:
        idp.publish(("k1", key))
        trusted = {"algorithms": ["RS256"], "jwks_url": idp.url, "jwks_ca_file": str(ca_path)}
        cfg = config(app, path="/trusted", strip_prefix="/trusted", auth={"jwt": trusted})
        cfg["routes"].append({"path": "/system", "strip_prefix": "/system", "upstream": "app",
                              "auth": {"jwt": {"algorithms": ["RS256"], "jwks_url": idp.url}}})
        proxy = portico(cfg)
        base = f"http://127.0.0.1:{proxy.port}"
        assert httpx.get(f"{base}/trusted/echo", headers=auth, timeout=10).status_code == 200
        # The system's CAs do not know the private CA: the fetch fails, closed.
        assert httpx.get(f"{base}/system/echo", headers=auth, timeout=10).status_code == 503
        assert "CERTIFICATE_VERIFY_FAILED" in proxy.output()
