"""Certificate expiry gauges: configured files read at scrape time, automatic ones from status."""

from __future__ import annotations

from pathlib import Path

import trustme

from portico.admin.tlsmetrics import EXPIRY, tls_families
from portico.config.model import Config
from tests.support.tlscerts import CertFiles


def config(*certs: CertFiles) -> Config:
    return Config.model_validate({
        "server": {"listen": []},
        "tls": [{"listen": ["127.0.0.1:8443"], "certs": [c.entry() for c in certs]}],
        "upstreams": {"app": {"backends": ["http://127.0.0.1:5001"]}},
    })  # fmt: skip


def test_configured_and_automatic_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    a = CertFiles.write(ca, tmp_path, "a", "a.test", "www.a.test")
    b = CertFiles.write(ca, tmp_path, "b", "b.test")
    cfg = config(a, b)
    auto = {"tls[1]": {"names": ["c.test"], "not_after": "2030-01-01T00:00:00+00:00"},
            "tls[2]": {"names": ["d.test"], "not_after": None}}  # fmt: skip
    (family,) = tls_families(cfg, lambda: auto)
    assert family.name == EXPIRY and family.kind == "gauge"
    by_source = {dict(labels)["source"]: (dict(labels), v) for labels, v in family.samples}
    assert set(by_source) == {"certs[0]", "certs[1]", "auto"}  # d.test: not issued yet
    assert by_source["certs[0]"][0]["names"] == "a.test,www.a.test"
    assert by_source["auto"] == (
        {"listener": "tls[1]", "source": "auto", "names": "c.test"}, 1893456000.0
    )
    b.cert.write_text("not a certificate")  # broken on disk now: no sample rather than a wrong one
    (family,) = tls_families(cfg, None)
    assert [dict(labels)["source"] for labels, _ in family.samples] == ["certs[0]"]


def test_no_tls_no_family() -> None:
    cfg = Config.model_validate({"upstreams": {"app": {"backends": ["http://127.0.0.1:5001"]}}})
    assert tls_families(cfg, None) == []
