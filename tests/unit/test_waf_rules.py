"""The WAF's pure parts: what is loaded in which order, the exclusion rules written for a
path, verdicts from matched rule ids, and the config's refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from portico.config.routes import Route
from portico.config.waf import Waf
from portico.policy.waf import (
    EXCLUSION_ID_BASE,
    crs_settings,
    engine_directives,
    exclusion_directives,
    sources,
    verdict,
)


def route(waf: object) -> Route:
    return Route.model_validate({"path": "/", "upstream": "app", "waf": waf})


def test_waf_keys_and_shorthands() -> None:
    assert route({"enabled": True}).waf == Waf()
    assert route(True).waf == Waf()
    assert route(False).waf is None
    cfg = route({"mode": "detect", "paranoia_level": 2, "body_limit": "1MiB"}).waf
    assert cfg is not None and cfg.mode == "detect" and int(cfg.body_limit) == 1 << 20


@pytest.mark.parametrize(
    ("waf", "where"),
    [
        ({"paranoia_level": 5}, "paranoia_level"),
        ({"inbound_threshold": 0}, "inbound_threshold"),
        ({"mode": "log"}, "mode"),
        ({"exclude_rules": [0]}, "exclude_rules"),
        ({"exclusions": [{"path": "search", "rules": [942100]}]}, "exclusions.0.path"),
        ({"exclusions": [{"path": "/s", "rules": []}]}, "exclusions.0.rules"),
        ({"exclusions": [{"path": "/s", "rules": [1], "args": ["a b"]}]}, "exclusions.0.args"),
        ({"crs": "", "rules": []}, "waf"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_waf_config_is_refused_with_its_key(waf: dict[str, object], where: str) -> None:
    with pytest.raises(ValidationError) as info:
        route(waf)
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert any(where in loc for loc in locs), locs


def test_sources_load_setup_then_exclusions_then_crs_then_removals_then_user_rules(
    tmp_path: object,
) -> None:
    cfg = Waf(
        exclusions=[{"path": "/search", "rules": [942100]}],  # type: ignore[list-item]
        exclude_rules=[941100],
        rules=["/etc/extra.conf"],
        directives="SecAction \"id:1,pass,nolog\"",
        crs="/nonexistent-crs",
    )
    got = sources(cfg, "routes[3].waf")
    keys = [s.key for s in got]
    assert keys == [
        "routes[3].waf",
        "routes[3].waf.paranoia_level",
        "routes[3].waf.crs_setup",
        "routes[3].waf.exclusions",
        "routes[3].waf.exclude_rules",
        "routes[3].waf.rules[0]",
        "routes[3].waf.directives",
    ]
    assert got[4].value == "SecRuleRemoveById 941100"


def test_engine_always_on_body_limit_and_partial_processing() -> None:
    text = engine_directives(Waf(body_limit=4096, mode="detect"))  # type: ignore[arg-type]
    # Detect mode is ours (the intervention is ignored), so the engine still decides.
    assert "SecRuleEngine On" in text
    assert "SecRequestBodyLimit 4096" in text
    assert "SecRequestBodyLimitAction ProcessPartial" in text
    assert "SecResponseBodyAccess Off" in text
    assert "SecResponseBodyAccess On" in engine_directives(Waf(inspect_response=True))


def test_crs_settings_carry_paranoia_and_thresholds() -> None:
    text = crs_settings(Waf(paranoia_level=3, inbound_threshold=10, outbound_threshold=7))
    assert "tx.paranoia_level=3" in text
    assert "tx.inbound_anomaly_score_threshold=10" in text
    assert "tx.outbound_anomaly_score_threshold=7" in text


def test_exclusions_become_phase_1_ctl_rules_per_path_and_argument() -> None:
    cfg = Waf(
        exclusions=[  # type: ignore[list-item]
            {"path": "/search", "rules": [942100, 942200]},
            {"path": "/comments", "rules": [941100], "args": ["body", "title"]},
        ]
    )
    first, second = exclusion_directives(cfg).splitlines()
    assert first.startswith('SecRule REQUEST_FILENAME "@beginsWith /search"')
    assert f"id:{EXCLUSION_ID_BASE}," in first and "phase:1" in first
    assert "ctl:ruleRemoveById=942100,ctl:ruleRemoveById=942200" in first
    assert f"id:{EXCLUSION_ID_BASE + 1}," in second
    assert "ctl:ruleRemoveTargetById=941100;ARGS:body" in second
    assert "ctl:ruleRemoveTargetById=941100;ARGS:title" in second


def test_verdicts() -> None:
    v = verdict(403, [920100, 942100, 949110])
    assert v.block and v.status == 403 and v.rules == (920100, 942100, 949110)
    assert v.score_rules == (920100, 942100)
    assert not verdict(None, [920350]).block
    assert not verdict(None, []).rules


def test_rules_compile_once_per_config_and_routes_without_waf_hold_no_stage() -> None:
    pytest.importorskip("libmodsecurity", reason="pip install 'portico[waf]'")
    import os

    from portico.config.model import Config
    from portico.runtime.snapshot import compile_config
    from portico.runtime.waf import WafStage

    if not os.path.isdir("/usr/share/modsecurity-crs/rules"):
        pytest.skip("the OWASP CRS is not installed (apt install modsecurity-crs)")
    config = Config.model_validate(
        {
            "upstreams": {"app": {"backends": ["http://127.0.0.1:5001"]}},
            "routes": [
                {"path": "/a", "upstream": "app", "waf": True},
                {"path": "/b", "upstream": "app", "waf": {"enabled": True}},
                {"path": "/c", "upstream": "app", "waf": {"paranoia_level": 2}},
                {"path": "/d", "upstream": "app"},
                {"path": "/e", "upstream": "app", "waf": {"enabled": False}},
            ],
        }
    )
    routes = {r.name: r for r in compile_config(config).router.routes}
    a, b, c = (
        next(s for s in routes[f"routes[{i}]"].request_stages if isinstance(s, WafStage))
        for i in range(3)
    )
    assert a.rules is b.rules  # equal tables share one compiled rule set
    assert c.rules is not a.rules
    assert routes["routes[3]"].request_stages == ()
    assert routes["routes[4]"].request_stages == ()


def test_the_waf_runs_after_traffic_control_and_before_rewrites() -> None:
    pytest.importorskip("libmodsecurity", reason="pip install 'portico[waf]'")
    import os

    from portico.config.model import Config
    from portico.runtime.snapshot import compile_config

    if not os.path.isdir("/usr/share/modsecurity-crs/rules"):
        pytest.skip("the OWASP CRS is not installed (apt install modsecurity-crs)")
    config = Config.model_validate(
        {
            "request_id": True,
            "upstreams": {"app": {"backends": ["http://127.0.0.1:5001"]}},
            "routes": [
                {
                    "path": "/api",
                    "upstream": "app",
                    "waf": {"inspect_response": True},
                    "ip_deny": ["10.0.0.0/8"],
                    "rate_limit": {"rate": 10},
                    "strip_prefix": "/api",
                    "request_headers": {"set": {"X-A": "1"}},
                }
            ],
        }
    )
    (route,) = compile_config(config).router.routes
    names = [type(s).__name__ for s in route.request_stages]
    assert names.index("WafStage") > max(names.index("IpRules"), names.index("LocalRateLimit"))
    assert names.index("WafStage") < names.index("PathRewrite") < names.index("RequestHeaders")
    assert "WafResponse" in [type(s).__name__ for s in route.response_stages]
