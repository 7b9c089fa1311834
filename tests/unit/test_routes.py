"""The route table and its parts, pure: precedence, templates, path normalization, stages,
split and mirror shares, config refusals (with key paths) and shadowed-route warnings."""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections import Counter
from typing import Any

import pytest

from portico.codec.events import RequestHead
from portico.codec.paths import normalize_path
from portico.config.load import load_text
from portico.config.model import Config
from portico.errors import ConfigError
from portico.runtime.compile import shadowed
from portico.runtime.request import RequestState, Template
from portico.runtime.routes import MirrorSpec, Router, RouteTarget, Split
from portico.runtime.snapshot import compile_config
from portico.runtime.stages import HeaderEdit, PrefixFix, RequestId
from tests.support.tomlwriter import dumps

UPSTREAM = {"app": {"backends": ["http://127.0.0.1:5001"]}}


def config_of(routes: list[dict[str, Any]], **top: Any) -> Config:
    return load_text(dumps({**top, "upstreams": UPSTREAM, "routes": routes}), "test.toml")


def router_of(routes: list[dict[str, Any]]) -> Router:
    return compile_config(config_of(routes)).router


def state(
    target: str,
    host: str | None = "site.test",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    peer: str = "192.0.2.1",
    trusted: bool = False,
) -> RequestState:
    pairs = [(k.encode(), v.encode("latin-1")) for k, v in headers or []]
    head = RequestHead(
        method.encode(),
        target.encode(),
        b"1.1",
        pairs,
        host=host.encode() if host is not None else None,
        keep_alive=True,
        framing="none",
        content_length=None,
        connection_tokens=frozenset(),
        expect_continue=False,
        upgrade=False,
    )
    return RequestState(
        head, head.target, head.host, peer, trusted, b"http", 0.0, TRUST if trusted else None
    )


class TrustedNetwork:
    """The forwarding policy as ``RequestState`` sees it: 10.0.0.0/8 are trusted proxies."""

    network = ipaddress.ip_network("10.0.0.0/8")

    def trusts(self, ip: str) -> bool:
        return ipaddress.ip_address(ip) in self.network


TRUST = TrustedNetwork()


def matched(router: Router, req: RequestState) -> str | None:
    route = router.match(req)
    return route.name if route is not None else None


def say(name: str, **match: Any) -> dict[str, Any]:
    return {"name": name, **match, "respond": {"body": name}}


# --- precedence -----------------------------------------------------------------------------------

PRECEDENCE = [
    say("file-order-1", path="/same/"),
    say("file-order-2", path="/same/"),
    say("no-host", path="/"),
    say("short-wild", host="*.test"),
    say("long-wild", host="*.site.test"),
    say("exact-host", host="www.site.test"),
    say("prefix", path="/p/"),
    say("longer-prefix", path="/p/q/"),
    say("regex", path_regex="^/p/q/r"),
    say("exact-path", path_exact="/p/q/r"),
    say("fewer", path="/c/", methods=["GET"]),
    say("more", path="/c/", methods=["GET"], headers={"X-A": "1"}),
    say("low", path="/prio/deep/", headers={"X-A": "1"}),
    say("high", path="/prio/", priority=3),
    say("negative", path_exact="/neg", priority=-1),
    say("neg-fallback", path="/ne"),
]


@pytest.mark.parametrize(
    ("target", "host", "headers", "expected"),
    [
        ("/same/x", "x", [], "file-order-1"),  # a tie goes to the first in the file
        ("/x", "www.site.test", [], "exact-host"),
        ("/x", "a.site.test", [], "long-wild"),
        ("/x", "a.b.site.test", [], "long-wild"),
        ("/x", "other.test", [], "short-wild"),
        ("/x", "site.test", [], "short-wild"),
        ("/x", "test", [], "no-host"),
        ("/x", None, [], "no-host"),
        ("/p/x", "x", [], "prefix"),
        ("/p/q/x", "x", [], "longer-prefix"),
        ("/p/q/rs", "x", [], "regex"),
        ("/p/q/r", "x", [], "exact-path"),
        ("/c/x", "x", [("X-A", "1")], "more"),
        ("/c/x", "x", [("X-A", "2")], "fewer"),
        ("/prio/deep/x", "x", [("X-A", "1")], "high"),
        ("/neg", "x", [], "neg-fallback"),  # a negative priority loses to everything
    ],
)
def test_precedence(
    target: str, host: str | None, headers: list[tuple[str, str]], expected: str
) -> None:
    assert matched(router_of(PRECEDENCE), state(target, host, headers=headers)) == expected


def test_a_route_whose_conditions_fail_gives_way_to_the_next() -> None:
    router = router_of([say("post", methods=["POST"]), say("query", query={"a": "1"})])
    assert matched(router, state("/?a=1", method="POST")) == "post"
    assert matched(router, state("/?a=1")) == "query"
    assert matched(router, state("/?a=2")) is None


def test_a_single_catch_all_route_is_returned_without_lookups() -> None:
    router = router_of([{"upstream": "app"}])
    assert router.only is not None
    assert router.match(state("/anything", host=None)) is router.only
    conditional = router_of([say("only-post", methods=["POST"])])
    assert conditional.only is None
    assert matched(conditional, state("/")) is None


def test_clients_match_after_trusted_proxy_resolution() -> None:
    router = router_of([say("inside", clients=["198.51.100.0/24"]), say("rest")])
    xff = [("X-Forwarded-For", "198.51.100.7, 10.1.1.1")]
    assert matched(router, state("/", peer="10.0.0.1", trusted=True, headers=xff)) == "inside"
    assert matched(router, state("/", peer="10.0.0.1", headers=xff)) == "rest"  # untrusted
    assert matched(router, state("/", peer="198.51.100.9")) == "inside"


def test_regex_captures_reach_the_request() -> None:
    router = router_of([say("items", path_regex="^/items/(?P<id>[0-9]+)/(\\w+)$")])
    req = state("/items/42/edit?x=1")
    assert matched(router, req) == "items"
    assert req.captures == {"id": "42", "1": "42", "2": "edit"}


def test_a_thousand_host_and_a_thousand_path_routes() -> None:
    routes = [say(f"host-{i}", host=f"h{i}.example.test") for i in range(1000)]
    routes += [say(f"path-{i}", path=f"/p{i}/") for i in range(1000)]
    routes.append(say("wild", host="*.example.test"))
    router = router_of(routes)
    assert matched(router, state("/x", host="h517.example.test")) == "host-517"
    assert matched(router, state("/p733/x", host="other")) == "path-733"
    assert matched(router, state("/p733/x", host="zz.example.test")) == "wild"
    assert matched(router, state("/q", host="other")) is None


# --- split and mirror -----------------------------------------------------------------------------


def target(weight: int) -> RouteTarget:
    return RouteTarget(object(), weight, 1.0, 1.0, 1.0, object(), 1.0)


def test_split_gives_exact_shares_and_skips_zero_weights() -> None:
    a, b, never = target(9), target(1), target(0)
    split = Split([a, never, b], sticky=False)
    picks = [split.pick("192.0.2.1") for _ in range(1000)]
    assert picks.count(a) == 900 and picks.count(b) == 100 and never not in picks
    # Smooth: the small share is spread out, never two in a row.
    assert all(not (x is b and y is b) for x, y in itertools.pairwise(picks))


def test_sticky_split_is_stable_per_client_and_follows_weights() -> None:
    a, b = target(3), target(1)
    split = Split([a, b], sticky=True)
    clients = [f"198.51.100.{i}" for i in range(256)] + [f"2001:db8::{i:x}" for i in range(256)]
    first = {c: split.pick(c) for c in clients}
    assert all(split.pick(c) is first[c] for c in clients)
    share = Counter(t is b for t in first.values())[True] / len(clients)
    assert 0.15 < share < 0.35
    # Another Split over the same targets (another worker, a reload) agrees.
    again = Split([a, b], sticky=True)
    assert all(again.pick(c) is first[c] for c in clients)


def test_mirror_share_and_bound() -> None:
    spec = MirrorSpec(target(1), 25.0, max_concurrent=2, max_body=0, timeout=1.0)
    assert [spec.take() for _ in range(8)] == [False, False, False, True] * 2
    spec = MirrorSpec(target(1), 100.0, max_concurrent=2, max_body=0, timeout=1.0)
    taken = 0
    for _ in range(5):
        if spec.take():
            spec.in_flight += 1  # what start_mirror does
            taken += 1
    assert taken == 2
    spec.in_flight -= 1
    assert spec.take()


# --- templates ------------------------------------------------------------------------------------


def test_template_renders_variables_and_captures() -> None:
    router = router_of([say("r", path_regex="^/u/(?P<user>[^/]+)")])
    req = state("/u/ann/x?y=1", host="site.test:8080", method="PUT")
    req.route = router.match(req)  # as the pipeline does
    req.request_id = b"rid"
    tpl = Template(
        "{scheme}://{hostname}|{host}|{path}|{query}|{method}|{route}|{user}|{1}|{request_id}|{client_ip}"
    )
    assert (
        tpl.render(req)
        == b"http://site.test|site.test:8080|/u/ann/x|?y=1|PUT|r|ann|ann|rid|192.0.2.1"
    )
    assert tpl.literal is None


def test_template_literals() -> None:
    req = state("/")
    assert Template("{{not a var}}").render(req) == b"{not a var}"
    assert Template("plain").literal == b"plain"
    assert Template("").render(req) == b""
    assert Template("{missing_capture}").render(req) == b""  # a capture that did not take part


def test_template_never_renders_cr_lf_or_nul_into_a_head() -> None:
    req = state("/")
    req.captures = {"evil": "a\r\nSet-Cookie: x=1\x00"}
    tpl = Template("v={evil}")
    assert tpl.render(req) == b"v=aSet-Cookie: x=1"
    assert tpl.render(req, in_head=False) == b"v=a\r\nSet-Cookie: x=1\x00"  # a body keeps them


# --- path normalization ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        (b"/api/v1", b"/api/v1"),
        (b"/%61pi", b"/api"),
        (b"/%7e%2d%2E%5F", b"/~-._"),
        (b"/a%2fb", b"/a%2Fb"),  # a reserved character stays encoded (uppercased)
        (b"/a%20b", b"/a%20b"),
        (b"/a%zz", b"/a%zz"),
        (b"/x/../api", b"/api"),
        (b"/a/./b", b"/a/b"),
        (b"/a/b/..", b"/a/"),
        (b"/a/b/.", b"/a/b/"),
        (b"//a///b", b"/a/b"),
        (b"/a//", b"/a/"),
        (b"/a/.b/..c", b"/a/.b/..c"),  # only whole dot segments count
        (b"/%2e%2e%2fx", b"/..%2Fx"),  # one segment named "..%2Fx"
        (b"/.", b"/"),
        (b"/..", None),
        (b"/a/../..", None),
        (b"/%2e%2e/x", None),
        (b"/a/%2E%2E/%2e%2e/b", None),
    ],
)
def test_normalize_path(path: bytes, normal: bytes | None) -> None:
    assert normalize_path(path) == normal


def test_normalize_path_keeps_a_clean_path_as_is() -> None:
    path = b"/api/v1/users"
    assert normalize_path(path) is path


# --- stages ---------------------------------------------------------------------------------------


def test_header_edit_removes_then_sets_then_adds() -> None:
    edit = HeaderEdit({"X-Set": "{method}"}, {"X-Add": "a"}, ["X-Gone"])
    headers = [(b"X-Set", b"old"), (b"x-gone", b"1"), (b"X-Add", b"orig"), (b"X-Keep", b"k")]
    assert edit.apply(state("/"), headers) == [
        (b"X-Add", b"orig"),
        (b"X-Keep", b"k"),
        (b"X-Set", b"GET"),
        (b"X-Add", b"a"),
    ]


@pytest.mark.parametrize(
    ("trusted", "sent", "kept"),
    [(True, "abc", True), (False, "abc", False), (True, "a b", False), (True, None, False)],
)
def test_request_id_stage(trusted: bool, sent: str | None, kept: bool) -> None:
    req = state("/", headers=[("X-Request-ID", sent)] if sent else [], trusted=trusted)
    RequestId("X-Request-ID").on_request(req)
    assert req.request_id is not None
    assert (req.request_id == b"abc") is kept
    assert [v for n, v in req.head.headers if n.lower() == b"x-request-id"] == [req.request_id]


def test_request_ids_are_unique_and_each_stage_has_its_own_prefix() -> None:
    first, second = RequestId("X-Request-ID"), RequestId("X-Request-ID")  # e.g. a reload

    def ids(stage: RequestId, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            req = state("/")
            stage.on_request(req)
            assert req.request_id is not None and re.fullmatch(rb"[0-9a-f]{32}", req.request_id)
            out.append(req.request_id)
        return out

    a, b = ids(first, 5000), ids(second, 5000)
    assert len(set(a) | set(b)) == 10000
    assert a[0][:16] != b[0][:16]


@pytest.mark.parametrize(
    ("strip", "add", "app_path", "client_path"),
    [
        ("/app", None, "/", "/app/"),
        ("/app", None, "/login", "/app/login"),
        ("/app/", None, "/app/x", "/app/x"),  # already under the prefix
        (None, "/base", "/base/x", "/x"),
        (None, "/base", "/other", "/other"),  # outside the mapping: untouched
        ("/app", "/base", "/base/x", "/app/x"),
        ("/app", "/base", "/base", "/app/"),
    ],
)
def test_prefix_fix_maps_app_paths_back(
    strip: str | None, add: str | None, app_path: str, client_path: str
) -> None:
    fix = PrefixFix(strip, add, True, True, {})
    assert fix.client_path(app_path.encode()) == client_path.encode()


# --- config refusals ------------------------------------------------------------------------------


def problems(routes: list[dict[str, Any]], **top: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        config_of(routes, **top)
    found: list[tuple[str, str]] = info.value.problems
    return found


@pytest.mark.parametrize(
    ("route", "path", "reason"),
    [
        ({"path_regex": "^/(a", "upstream": "app"}, "routes[0].path_regex", "invalid regex"),
        (
            {"headers": {"X-A": {"regex": "["}}, "upstream": "app"},
            "routes[0].headers.X-A",
            "invalid regex",
        ),
        (
            {"query": {"q": {"regex": "*"}}, "upstream": "app"},
            "routes[0].query.q",
            "invalid regex",
        ),
        (
            {"rewrite": {"regex": "(", "to": "/"}, "upstream": "app"},
            "routes[0].rewrite.regex",
            "invalid regex",
        ),
        ({"redirect": {"to": "/x/{nope}"}}, "routes[0].redirect.to", "unknown variable {nope}"),
        (
            {"path_regex": "^/(?P<a>.*)$", "redirect": {"to": "/{b}"}},
            "routes[0].redirect.to",
            "unknown variable {b}",
        ),
        (
            {"upstream": "app", "request_headers": {"set": {"X-A": "{client}"}}},
            "routes[0].request_headers.set.X-A",
            "unknown variable {client}",
        ),
        (
            {"upstream": "app", "response_headers": {"add": {"X-A": "{1}"}}},
            "routes[0].response_headers.add.X-A",
            "unknown variable {1}",
        ),
        (
            {"upstream": "app", "rewrite": {"regex": "^/(x)", "to": "/{2}"}},
            "routes[0].rewrite.to",
            "unknown variable {2}",
        ),
        ({"respond": {"body": "{nope}"}}, "routes[0].respond.body", "unknown variable {nope}"),
        ({"redirect": {"to": "/x/{"}}, "routes[0].redirect.to", "unbalanced braces"),
        (
            {"upstream": "app", "request_headers": {"set": {"X A": "1"}}},
            "routes[0].request_headers.set",
            "'X A' is not a header name",
        ),
        (
            {"upstream": "app", "response_headers": {"remove": ["X:A"]}},
            "routes[0].response_headers.remove",
            "'X:A' is not a header name",
        ),
        (
            {"upstream": "app", "headers": {"Bad Name": "1"}},
            "routes[0].headers",
            "is not a header name",
        ),
        (
            {"upstream": "app", "request_headers": {"set": {"X-A": "a\r\nB: c"}}},
            "routes[0].request_headers.set.X-A",
            "may not contain CR, LF or NUL",
        ),
        (
            {"upstream": "app", "response_headers": {"add": {"X-A": "a\x00"}}},
            "routes[0].response_headers.add.X-A",
            "may not contain CR, LF or NUL",
        ),
        ({"redirect": {"to": "/a\nb"}}, "routes[0].redirect.to", "may not contain CR, LF or NUL"),
        (
            {"respond": {"headers": {"X-A": "a\rb"}}},
            "routes[0].respond.headers.X-A",
            "may not contain CR, LF or NUL",
        ),
        (
            {"split": [{"upstream": "app", "weight": 0}, {"upstream": "app", "weight": 0}]},
            "routes[0].split",
            "the weights sum to 0",
        ),
        ({"upstream": "nope"}, "routes[0].upstream", "no upstream named 'nope'"),
        (
            {"split": [{"upstream": "app", "weight": 1}, {"upstream": "nope", "weight": 1}]},
            "routes[0].split[1].upstream",
            "no upstream named 'nope'",
        ),
        (
            {"upstream": "app", "mirror": {"upstream": "nope"}},
            "routes[0].mirror.upstream",
            "no upstream named 'nope'",
        ),
        (
            {"upstream": "app", "request_headers": {"set": {"X-Forwarded-For": "1"}}},
            "routes[0].request_headers",
            "X-Forwarded-For cannot be edited here",
        ),
        (
            {"upstream": "app", "response_headers": {"remove": ["Transfer-Encoding"]}},
            "routes[0].response_headers",
            "Transfer-Encoding cannot be edited here",
        ),
        ({"upstream": "app", "respond": {}}, "routes[0]", "give exactly one of upstream"),
        ({"path": "/x"}, "routes[0]", "give exactly one of upstream"),
        ({"upstream": "app", "path": "/a", "path_exact": "/b"}, "routes[0]", "give one of path"),
        ({"upstream": "app", "host": "*.*.x"}, "routes[0].host", "is not a host name"),
        (
            {"upstream": "app", "host": ["ok.test", "bad host"]},
            "routes[0].host",
            "is not a host name",
        ),
        ({"upstream": "app", "methods": []}, "routes[0].methods", "at least one method"),
        ({"upstream": "app", "upgrades": ["h2 c"]}, "routes[0].upgrades", "Upgrade protocol"),
        (
            {"upstream": "app", "path": "/api/", "strip_prefix": "/other"},
            "routes[0]",
            "strip_prefix '/other' is not a prefix",
        ),
        ({"redirect": {"to": "/x", "status": 300}}, "routes[0].redirect.status", "must be 301"),
        (
            {"respond": {"status": 204, "body": "x"}},
            "routes[0].respond.body",
            "a 204 answer has no body",
        ),
    ],
)
def test_bad_routes_are_refused_with_the_key_path(
    route: dict[str, Any], path: str, reason: str
) -> None:
    found = problems([route])
    assert len(found) == 1, found
    ((got_path, got_reason),) = found
    assert got_path == path
    assert reason in got_reason, got_reason


def test_bad_request_id_header_is_refused() -> None:
    assert problems([], request_id={"header": "X Req"}) == [
        ("request_id.header", "'X Req' is not a header name (an HTTP token)")
    ]


def test_request_id_short_forms() -> None:
    assert config_of([{"upstream": "app"}], request_id=True).request_id is not None
    assert config_of([{"upstream": "app"}], request_id=False).request_id is None
    cfg = config_of([{"upstream": "app"}], request_id={"header": "X-Trace"})
    assert cfg.request_id is not None and cfg.request_id.header == "X-Trace"


# --- shadowed routes ------------------------------------------------------------------------------


def warnings_for(routes: list[dict[str, Any]]) -> list[str]:
    found: list[str] = shadowed(config_of(routes))
    return found


def test_no_warning_when_every_route_can_match() -> None:
    assert (
        warnings_for(
            [
                say("all"),
                say("api", path="/api/"),
                say("get", path="/api/", methods=["GET"]),
                say("hdr", headers={"X-A": "1"}),
                say("host", host="a.test"),
                say("wild", host="*.test"),
                say("regex", path_regex="^/x"),
            ]
        )
        == []
    )


@pytest.mark.parametrize(
    ("routes", "shadowed_index", "by"),
    [
        ([say("a", path="/api/"), say("b", path="/api/")], 1, "a"),
        ([say("all", priority=1), say("api", path="/api/")], 1, "all"),
        ([say("wild", host="*.test", priority=1), say("exact", host="a.test")], 1, "wild"),
        ([say("any", path="/a/", priority=1), say("get", path="/a/b", methods=["GET"])], 1, "any"),
        ([say("r", path_regex="^/x", priority=1), say("r2", path_regex="^/x")], 1, "r"),
        (
            [
                say("hdr", headers={"X-A": "1"}, priority=1),
                say("more", headers={"X-A": "1"}, query={"q": "1"}),
            ],
            1,
            "hdr",
        ),
    ],
)
def test_a_route_covered_by_an_earlier_one_is_reported(
    routes: list[dict[str, Any]], shadowed_index: int, by: str
) -> None:
    (warning,) = warnings_for(routes)
    assert warning.startswith(f"routes[{shadowed_index}]: never matched: {by} (")


def test_a_partial_overlap_is_not_reported() -> None:
    assert (
        warnings_for(
            [
                say("get", path="/a/", methods=["GET"], priority=1),
                say("any", path="/a/"),  # a POST still reaches it
                say("exact-host", host="a.test", priority=1),
                say("wild", host="*.test"),  # b.test still reaches it
                say("regex", path_regex="^/a", priority=2),
                say("prefix", path="/a/b/"),  # cannot be decided from the config: not reported
                say("ten", path="/n/", clients=["10.0.0.0/8"], priority=1),
                say("n", path="/n/"),  # other clients still reach it
                say("hdr", path="/h/", headers={"X-A": "1"}, priority=1),
                say("h", path="/h/"),  # requests without X-A still reach it
            ]
        )
        == []
    )


def test_mirror_needs_a_proxy_route() -> None:
    from portico.config.load import load_text
    from portico.errors import ConfigError

    text = (
        '[upstreams.a]\nbackends = ["http://127.0.0.1:1"]\n'
        '[[routes]]\npath = "/x"\nrespond = { body = "hi" }\nmirror = { upstream = "a" }\n'
    )
    try:
        load_text(text)
    except ConfigError as e:
        assert any("mirror" in reason for _, reason in e.problems)
    else:
        raise AssertionError("a mirror on a respond route was accepted")
