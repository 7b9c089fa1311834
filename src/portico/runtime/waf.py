"""The WAF stage: ModSecurity (libmodsecurity through its PyPI binding) with the OWASP CRS.

Theory of operation. Rule sets are compiled when the config compiles, once per distinct
``waf`` table (routes that agree share one ``RulesSet``), never per request. Per request a
``Transaction`` runs the phases: connection, URI, request headers (phase 1), then the
request body (phase 2; the CRS does most of its work there, query arguments included).

* A request without a body is decided inside ``on_request``: a clean one goes on with no
  other cost; a match returns a ``WafCheck`` already decided, so the data plane can log it
  (this layer does not log) and answer 403 or, in detect mode, let it through.
* A request with a body returns a ``WafCheck`` still open: the data plane
  (dataplane/wafbody.py) feeds it the first ``body_limit`` bytes, then asks for the
  verdict, and only then starts the handler and replays those bytes; the rest streams.

A rule set that does not load raises ``WafRulesError`` naming the config key, so a reload
with a broken rule keeps the old config, and ``portico check`` reports it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from functools import cache
from typing import TYPE_CHECKING

from portico.codec.writer import REASONS
from portico.config.waf import Waf
from portico.policy.waf import Source, Verdict, signature, sources, verdict
from portico.runtime.request import Headers, RequestState
from portico.runtime.stages import BodyFilter, Hold, LocalReply, Stage

if TYPE_CHECKING:
    from libmodsecurity import ModSecurity, RulesSet, Transaction

INSTALL_HINT = "pip install 'portico[waf]'"


class WafRulesError(Exception):
    """A rule set that cannot be loaded: ``key`` is the config key path to blame."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _discard(_message: str) -> None:
    return None  # matches are read per transaction (get_rule_messages), not from this log


@cache
def engine() -> ModSecurity:
    """One ModSecurity engine per process; it holds no per-request state."""
    try:
        from libmodsecurity import ModSecurity
    except ImportError as exc:
        raise WafRulesError("waf", f"libmodsecurity is not installed ({INSTALL_HINT})") from exc
    ms = ModSecurity()
    ms.set_connector_information("Portico")
    ms.set_log_callback(_discard)
    return ms


def load_rules(srcs: list[Source]) -> RulesSet:
    """Compile the sources into one rule set; the first that fails raises with its key."""
    engine()  # the import check, with its install hint
    from libmodsecurity import RulesSet

    rules = RulesSet()
    for src in srcs:
        if src.kind == "file":
            try:
                with open(src.value, "rb"):
                    pass
            except OSError as exc:
                raise WafRulesError(src.key, f"cannot read {src.value}: {exc.strerror}") from None
            loaded = rules.load_from_uri(src.value)
        else:
            loaded = rules.load(src.value)
        if loaded < 0:
            raise WafRulesError(src.key, _parser_error(rules.get_parser_error()))
    return rules


def _parser_error(text: str) -> str:
    return " ".join(text.split())[:400] or "does not compile"


def compile_waf(cfg: Waf, key: str, cache_: dict[tuple[object, ...], RulesSet]) -> WafStage:
    """The stage for one route. ``cache_`` lives for one compile: equal configs share rules."""
    sig = signature(cfg)
    rules = cache_.get(sig)
    if rules is None:
        rules = cache_[sig] = load_rules(sources(cfg, key))
    return WafStage(rules, cfg.mode == "detect", int(cfg.body_limit), cfg.inspect_response)


def _has_body(req: RequestState) -> bool:
    head = req.head
    if head.framing == "none":
        return False
    return not (head.framing == "length" and not head.content_length)


class WafCheck(Hold):
    """One request's inspection, returned by ``WafStage.on_request`` for the data plane to
    finish (a hold until the WAF has decided): ``verdict`` is set when decided; otherwise
    ``feed`` the body then ``decide``."""

    __slots__ = ("detect", "fed", "limit", "response", "sink", "tx", "verdict")

    def __init__(self, tx: Transaction, detect: bool, limit: int) -> None:
        super().__init__()
        self.tx = tx
        self.detect = detect
        self.limit = limit
        self.fed = 0
        self.verdict: Verdict | None = None
        # With inspect_response: where the data plane wants the response verdict (it logs),
        # and the response's own verdict once the response ended.
        self.sink: Callable[[RequestState, WafCheck], None] | None = None
        self.response: Verdict | None = None

    def feed(self, data: bytes) -> bool:
        """Inspect body bytes up to the limit; True once the limit is reached."""
        room = self.limit - self.fed
        if room > 0:
            part = data if len(data) <= room else data[:room]
            self.tx.append_request_body(part)
            self.fed += len(part)
        return self.fed >= self.limit

    def decide(self) -> Verdict:
        tx = self.tx
        tx.process_request_body()
        self.verdict = v = _conclude(tx)
        return v

    @property
    def blocks(self) -> bool:
        v = self.verdict
        return v is not None and v.block and not self.detect

    def reply(self, req: RequestState) -> LocalReply:
        """The 403 (or the status the rules asked for) naming the request ID."""
        v = self.verdict
        status = v.status if v is not None else 403
        rid = request_id(req)
        reason = REASONS.get(status, b"Forbidden")
        body = b"%d %s\nrequest id: %s\n" % (status, reason, rid)
        headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
        if req.route is None or req.route.request_id_header is None:
            headers.append((b"X-Request-Id", rid))  # no request-ID stage adds it on the way out
        return LocalReply(status, headers, body)


def request_id(req: RequestState) -> bytes:
    """The request's ID; one is made when request IDs are off, so a block can be traced."""
    rid = req.request_id
    if rid is None:
        rid = req.request_id = secrets.token_hex(16).encode("ascii")
    return rid


def _conclude(tx: Transaction) -> Verdict:
    it = tx.intervention()
    status = it.status if it is not None and it.disruptive else None
    return verdict(status, [m.rule_id for m in tx.get_rule_messages()])


class WafStage(Stage):
    __slots__ = ("detect", "limit", "respond", "rules")
    on_request_hook = True

    def __init__(self, rules: RulesSet, detect: bool, limit: int, respond: bool = False) -> None:
        self.rules = rules
        self.detect = detect
        self.limit = limit
        self.respond = respond  # keep the transaction for WafResponse

    def on_request(self, req: RequestState) -> WafCheck | None:
        from libmodsecurity import Transaction

        head = req.head
        rid = req.request_id
        # An id of ours: ModSecurity would otherwise make one per request (about 20 us) for
        # the audit log, which is off.
        tx = Transaction(engine(), self.rules, rid.decode("latin-1") if rid else "-")
        tx.process_connection(req.client_ip, 0, "127.0.0.1", 0)
        tx.process_uri(
            req.target.decode("latin-1"),
            head.method.decode("latin-1"),
            head.version.decode("latin-1"),
        )
        for name, value in head.headers:
            tx.add_request_header(name.decode("latin-1"), value.decode("latin-1"))
        tx.process_request_headers()
        check = WafCheck(tx, self.detect, self.limit)
        if self.respond:
            req.waf = check
        it = tx.intervention()
        if (it is None or not it.disruptive) and _has_body(req):
            return check  # phase 2 waits for the body
        v = check.decide() if it is None or not it.disruptive else _conclude(tx)
        check.verdict = v
        return check if v.rules or self.respond else None


class WafResponse(Stage):
    """The response phases (``inspect_response``): headers (phase 3), then up to
    ``SecResponseBodyLimit`` of the body (phase 4). They can only be logged: the response is
    streamed, its head already on the way. The verdict goes to the check's ``sink`` when the
    request finishes."""

    __slots__ = ()
    on_response_hook = True
    body_hook = True

    def on_response(self, req: RequestState, status: int, headers: Headers) -> None:
        check = req.waf
        if type(check) is not WafCheck:
            return
        tx = check.tx
        for name, value in headers:
            tx.add_response_header(name.decode("latin-1"), value.decode("latin-1"))
        tx.process_response_headers(status, "HTTP/" + req.head.version.decode("latin-1"))
        if req.finishers is None:
            req.finishers = []
        req.finishers.append(lambda: _end_response(req, check))

    def body_filter(self, req: RequestState, status: int, headers: Headers) -> BodyFilter | None:
        check = req.waf
        return _ResponseBody(check.tx) if type(check) is WafCheck else None


# The most response body fed to ModSecurity (its own SecResponseBodyLimit default, 512 KiB).
RESPONSE_BODY_LIMIT = 524288


class _ResponseBody(BodyFilter):
    __slots__ = ("fed", "tx")

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.fed = 0

    def feed(self, data: bytes) -> bytes:
        room = RESPONSE_BODY_LIMIT - self.fed
        if room > 0:
            part = data if len(data) <= room else data[:room]
            self.tx.append_response_body(part)
            self.fed += len(part)
        return data


def _end_response(req: RequestState, check: WafCheck) -> None:
    req.waf = None
    tx = check.tx
    before = len(check.verdict.rules) if check.verdict is not None else 0
    tx.process_response_body()
    it = tx.intervention()
    status = it.status if it is not None and it.disruptive else None
    matched = [m.rule_id for m in tx.get_rule_messages()][before:]
    check.response = verdict(status, matched)
    if check.sink is not None and matched:
        check.sink(req, check)


def waf_stages(
    routes: Mapping[int, tuple[Waf, str]],
) -> dict[int, list[Stage]]:
    """Stages for the routes that have an enabled ``waf``: {route index: stages}."""
    cache_: dict[tuple[object, ...], RulesSet] = {}
    out: dict[int, list[Stage]] = {}
    for i, (cfg, key) in routes.items():
        if cfg.enabled:
            out[i] = [compile_waf(cfg, key, cache_)]
            if cfg.inspect_response:
                out[i].append(WafResponse())
    return out
