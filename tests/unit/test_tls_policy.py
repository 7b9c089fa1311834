"""Pure TLS decisions: which certificate a name gets, what a certificate file says, the
Mozilla profiles, the redirect and HSTS stages, and the schema."""

from __future__ import annotations

import datetime as dt

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from portico.codec.events import RequestHead
from portico.config.load import config_from_flags, validate
from portico.errors import ConfigError
from portico.policy.certificates import inspect
from portico.policy.certnames import NameTable
from portico.policy.tlsprofile import PROFILES
from portico.runtime.request import RequestState
from portico.runtime.tlsstages import Hsts, HttpsRedirect, stripped_request_headers, tls_stages

NOW = dt.datetime.now(dt.UTC)


def test_name_table_exact_then_one_label_wildcard_then_default() -> None:
    table = NameTable([(["a.test", "*.b.test"], "ab"), (["x.b.test", "A.TEST"], "x")], "dflt")
    assert table.select("a.test") == "ab"
    assert table.select("A.Test.") == "ab"  # case and trailing dot; first claim wins
    assert table.select("x.b.test") == "x"  # exact beats wildcard
    assert table.select("y.b.test") == "ab"
    assert table.select("b.test") == "dflt"  # the wildcard covers one label, not the apex
    assert table.select("z.y.b.test") == "dflt"  # nor two
    assert table.select(None) == "dflt"
    assert table.lookup("nothing") is None
    assert table.covers("q.b.test") and not table.covers("b.test")


def test_profiles_are_tls12_plus_and_aead_only() -> None:
    inter, modern = PROFILES["intermediate"], PROFILES["modern"]
    assert (inter.min_version, modern.min_version) == ("TLSv1.2", "TLSv1.3")
    assert inter.ciphers is not None and modern.ciphers is None
    for suite in inter.ciphers.split(":"):
        assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite)
    assert inter.alpn == ("http/1.1",)


def _pems(cert: trustme.LeafCert) -> tuple[bytes, bytes]:
    return b"".join(p.bytes() for p in cert.cert_chain_pems), cert.private_key_pem.bytes()


def test_inspect_a_good_certificate() -> None:
    ca = trustme.CA().create_child_ca()
    chain, key = _pems(ca.issue_cert("a.test", "*.b.test"))
    facts = inspect(chain, key, None, NOW)
    assert facts.names == ["a.test", "*.b.test"]
    assert facts.errors == [] and facts.warnings == []


def test_inspect_problems() -> None:
    ca = trustme.CA().create_child_ca()
    leaf = ca.issue_cert("a.test")
    chain = _pems(leaf)[0]
    other_key = _pems(ca.issue_cert("a.test"))[1]
    assert inspect(chain, other_key, None, NOW).errors == ["the key does not match the certificate"]
    reversed_chain = b"".join(p.bytes() for p in reversed(leaf.cert_chain_pems))
    assert "chain in the wrong order" in inspect(reversed_chain, None, None, NOW).errors[0]
    facts = inspect(chain, None, None, NOW)
    not_after = facts.not_after
    later = not_after + dt.timedelta(days=1)
    assert inspect(chain, None, None, later).errors[0].startswith("expired on ")
    earlier = facts.not_before - dt.timedelta(days=1)
    assert inspect(chain, None, None, earlier).errors[0].startswith("not valid before ")
    soon = inspect(chain, None, None, not_after - dt.timedelta(days=3))
    assert soon.errors == [] and soon.warnings == [f"expires on {not_after:%Y-%m-%d %H:%M} UTC"]
    with pytest.raises(ValueError, match="not a PEM certificate"):
        inspect(b"garbage", None, None, NOW)


def test_inspect_encrypted_keys() -> None:
    leaf = trustme.CA().issue_cert("a.test")
    chain = _pems(leaf)[0]
    private = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    encrypted = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret"),
    )
    assert inspect(chain, encrypted, b"s3cret", NOW).errors == []
    assert inspect(chain, encrypted, b"wrong", NOW).errors == ["wrong password for the key"]
    assert "the key is encrypted" in inspect(chain, encrypted, None, NOW).errors[0]


def _req(
    path: bytes, scheme: bytes, trusted: bool = False, xfp: bytes | None = None
) -> RequestState:
    headers = [(b"Host", b"a.test:8080")] + ([(b"X-Forwarded-Proto", xfp)] if xfp else [])
    head = RequestHead(
        b"GET",
        path,
        b"1.1",
        headers,
        host=b"a.test:8080",
        keep_alive=True,
        framing="none",
        content_length=None,
        connection_tokens=frozenset(),
        expect_continue=False,
        upgrade=False,
    )
    return RequestState(head, path, b"a.test:8080", "127.0.0.1", trusted, scheme, 0.0)


def test_https_redirect_stage() -> None:
    stage = HttpsRedirect(8443)
    reply = stage.on_request(_req(b"/x?y=1", b"http"))
    assert reply is not None and reply.status == 308
    assert dict(reply.headers)[b"Location"] == b"https://a.test:8443/x?y=1"
    assert dict(HttpsRedirect(443).on_request(_req(b"/", b"http")).headers)[  # type: ignore[union-attr]
        b"Location"
    ] == b"https://a.test/"
    assert stage.on_request(_req(b"/x", b"https")) is None
    assert stage.on_request(_req(b"/.well-known/acme-challenge/abc", b"http")) is None
    # A trusted load balancer that terminated TLS says so; an untrusted client cannot.
    assert stage.on_request(_req(b"/x", b"http", trusted=True, xfp=b"https")) is None
    assert stage.on_request(_req(b"/x", b"http", trusted=False, xfp=b"https")) is not None


def test_hsts_stage_only_over_https() -> None:
    config = validate({"upstreams": {"a": {"backends": ["http://127.0.0.1:1"]}},
                       "hsts": {"max_age": 60, "include_subdomains": True}})
    (stage,) = tls_stages(config, config.effective_routes()[0])
    assert isinstance(stage, Hsts)
    headers: list[tuple[bytes, bytes]] = []
    stage.on_response(_req(b"/", b"http"), 200, headers)
    assert headers == []
    stage.on_response(_req(b"/", b"https"), 200, headers)
    assert headers == [(b"Strict-Transport-Security", b"max-age=60; includeSubDomains")]


def test_unconfigured_tls_adds_no_stage() -> None:
    config = validate({"upstreams": {"a": {"backends": ["http://127.0.0.1:1"]}}})
    assert tls_stages(config, config.effective_routes()[0]) == []
    assert stripped_request_headers(config) is None


def test_schema() -> None:
    base = {"upstreams": {"a": {"backends": ["http://127.0.0.1:1"]}}}
    ok = validate({**base, "server": {"listen": []},
                   "tls": [{"listen": "127.0.0.1:8443", "certs": [{"cert": "c", "key": "k"}],
                            "client_auth": {"ca": "ca.pem"}}]})
    assert ok.tls[0].listen == ["127.0.0.1:8443"] and ok.tls[0].profile == "intermediate"
    assert stripped_request_headers(ok) == {b"x-client-cert-subject", b"x-client-cert-fingerprint"}
    with pytest.raises(ConfigError) as e:
        validate({**base, "server": {"listen": []}})
    assert e.value.problems == [("server.listen", "at least one listen address is needed")]
    with pytest.raises(ConfigError) as e:
        validate({**base, "tls": [{"listen": "127.0.0.1:1", "certs": [{"cert": "c", "key": "k"}],
                                   "profile": "old"}]})
    assert e.value.problems[0][0] == "tls[0].profile"
    with pytest.raises(ConfigError) as e:
        validate({**base, "tls": [{"listen": "127.0.0.1:1", "certs": [{"cert": "c", "key": "k"}],
                                   "default_cert": 1}]})
    assert e.value.problems == [("tls[0].default_cert", "there are 1 certificate(s)")]


def test_proxy_flags_make_a_tls_listener() -> None:
    config = config_from_flags(listen=["127.0.0.1:8443"], backends=["http://127.0.0.1:1"],
                               tls_certs=[("a.pem", "a.key"), ("b.pem", "b.key")])
    assert config.server.listen == []
    assert config.tls[0].listen == ["127.0.0.1:8443"]
    assert [c.cert for c in config.tls[0].certs] == ["a.pem", "b.pem"]


def test_ticket_keys_agree_per_period_and_rotate() -> None:
    from portico.policy.tickets import ROTATE_EVERY, TICKET_KEY_BYTES, period, ticket_key

    now = 1_700_000_000.0
    assert period(now) == period(now + 1) or period(now + 1) == period(now) + 1
    assert period(now + ROTATE_EVERY) == period(now) + 1
    key = ticket_key(b"s", period(now))
    assert len(key) == TICKET_KEY_BYTES
    assert key == ticket_key(b"s", period(now))  # another process derives the same
    assert key != ticket_key(b"s", period(now) + 1)
    assert key != ticket_key(b"t", period(now))


def test_openssl_settings_through_ctypes_are_verified_first() -> None:
    import ssl

    from portico.dataplane import openssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if not openssl.available():
        pytest.skip("libssl is not reachable through ctypes here")
    assert openssl.set_groups(ctx, "X25519:prime256v1")
    assert not openssl.set_groups(ctx, "no-such-group")
    assert openssl.set_ticket_key(ctx, bytes(80))
    with pytest.raises(ValueError):
        openssl.set_ticket_key(ctx, bytes(48))


def test_renewal_timing() -> None:
    from portico.policy.renewal import (
        Validity,
        needs_certificate,
        next_attempt,
        renew_time,
        retry_delay,
    )

    v = Validity(0.0, 90.0)
    assert renew_time(v, 2 / 3, 0.0) == pytest.approx(60.0)
    assert renew_time(v, 2 / 3, 0.999) == pytest.approx(64.5, abs=0.01)  # 5% jitter at most
    assert not needs_certificate(v, 59.0, 2 / 3, 0.0)
    assert needs_certificate(v, 61.0, 2 / 3, 0.0)
    assert needs_certificate(None, 0.0, 2 / 3, 0.0)
    assert needs_certificate(v, 90.0, 2 / 3, 0.0)  # expired
    assert next_attempt(v, 10.0, 2 / 3, 0.0, 0, 1.0, 8.0) == pytest.approx(60.0)
    assert next_attempt(None, 10.0, 2 / 3, 0.0, 0, 1.0, 8.0) == 10.0
    assert [retry_delay(n, 1.0, 8.0) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    # After failures the back-off holds, but a valid certificate is retried before its end.
    assert next_attempt(None, 10.0, 2 / 3, 0.0, 3, 1.0, 8.0) == 14.0
    assert next_attempt(v, 80.0, 2 / 3, 0.0, 5, 1.0, 3600.0) == pytest.approx(85.0)


def test_ticket_secret_is_filled_once_and_kept_by_a_reload() -> None:
    from portico.gateway import prepare_reload, with_secrets

    data = {"upstreams": {"a": {"backends": ["http://127.0.0.1:1"]}},
            "tls": [{"listen": "127.0.0.1:8443", "certs": [{"cert": "c", "key": "k"}]}]}
    running = with_secrets(validate(data))
    secret = running.tls[0].ticket_secret
    assert secret and len(secret) == 64
    reloaded, result = prepare_reload(running, validate(data))
    assert reloaded.tls[0].ticket_secret == secret  # tickets stay valid across a reload
    assert "tls" not in result.changed
    given = validate({**data, "tls": [{**data["tls"][0], "ticket_secret": "shared"}]})
    assert with_secrets(given).tls[0].ticket_secret == "shared"
