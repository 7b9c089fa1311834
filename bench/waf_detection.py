"""Replay the OWASP CRS's own regression tests through Portico's WAF and count what it catches.

    python bench/waf_detection.py CHECKOUT [--paranoia 1 2] [--out snippet.md]
    python bench/waf_detection.py CHECKOUT --url http://127.0.0.1:8080 --log portico.log

CHECKOUT is a copy of github.com/coreruleset/coreruleset at the tag matching the installed
rules (Debian 12's modsecurity-crs is 3.3.4: use tag v3.3.4); its test cases are read from
tests/regression/tests/*/*.yaml (the go-ftw/ftw format) and never copied here.

By default, for each paranoia level the script starts an HTTP backend (answers 200 to
anything) and `portico serve` in front of it with `waf = { paranoia_level = N }` and request
IDs on, logging to a file; with --url/--log it uses a Portico you started (request IDs on,
the WAF on its catch-all route). Each test stage is sent on its own connection as the test
wrote it: raw bytes for raw/encoded requests; for `data`, a Content-Length and, if the test
names no type, a form Content-Type are added, as ftw does. Its outcome: the status, and the
rules Portico's log names for its request ID.

A test expects a rule to match (`log_contains: id "N"`: an attack case) or not to match
(`no_log_contains`: a clean case). The report counts, per payload class (the CRS file the
test belongs to), how many attack cases had their rule match, how many were blocked (403),
and how many Portico's own HTTP parser refused (400) before the WAF saw them; and for clean
cases, how many matched the rule anyway (false positives) or were blocked. The rule's own
paranoia level is read from the rule files, so cases for rules above the running level are
shown apart: the CRS's tests are written for every level, and a PL1 run is not expected to
fire PL2-4 rules.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import http.client
import http.server
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CRS_RULES = "/usr/share/modsecurity-crs/rules"
# The payload classes the CRS documents, by the rule file (and test directory) prefix.
CLASSES = {
    "911": "method enforcement",
    "913": "scanner detection",
    "920": "protocol enforcement",
    "921": "protocol attack",
    "922": "multipart attack",
    "930": "path traversal / LFI",
    "931": "remote file inclusion",
    "932": "remote command execution",
    "933": "PHP injection",
    "934": "Node.js injection",
    "941": "XSS",
    "942": "SQL injection",
    "943": "session fixation",
    "944": "Java injection",
}
_ID = re.compile(r'id\s*\\?"(\d+)')
_LOG = re.compile(r"request_id=(\S+) rules=([\d,]+)")
CONNECT_TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 5.0


@dataclass
class Case:
    title: str
    group: str  # "942" etc.
    rule: int  # the rule the test is about
    attack: bool  # True: the rule must match; False: it must not
    request: bytes


@dataclass
class Outcome:
    status: int  # 0: no answer
    rules: set[int] = field(default_factory=set)


def rule_levels(rules_dir: str) -> dict[int, int]:
    """Each CRS rule id's paranoia level, from the EXECUTING_PARANOIA_LEVEL markers."""
    levels: dict[int, int] = {}
    for path in sorted(Path(rules_dir).glob("*.conf")):
        level = 1
        for line in path.read_text(errors="replace").splitlines():
            m = re.search(r'TX:EXECUTING_PARANOIA_LEVEL "@lt (\d)"', line)
            if m:
                level = int(m.group(1))
                continue
            m = re.search(r"\bid:(\d+)", line)
            if m:
                levels.setdefault(int(m.group(1)), level)
    return levels


def _request(inp: dict[str, object]) -> bytes:
    if "encoded_request" in inp:
        return base64.b64decode(str(inp["encoded_request"]))
    if "raw_request" in inp:
        raw = inp["raw_request"]
        text = "\r\n".join(raw) if isinstance(raw, list) else str(raw)
        return text.encode("latin-1", "replace")
    method = str(inp.get("method", "GET"))
    uri = str(inp.get("uri", "/"))
    version = str(inp.get("version", "HTTP/1.1"))
    headers = dict(inp.get("headers") or {})  # type: ignore[call-overload]
    data = inp.get("data")
    body = b""
    if data is not None:
        text = "\r\n".join(str(d) for d in data) if isinstance(data, list) else str(data)
        body = text.encode("latin-1", "replace")
        names = {str(k).lower() for k in headers}
        if not inp.get("stop_magic"):
            # As ftw does: a length for the data, and a form type when the test names none.
            if "content-length" not in names and "transfer-encoding" not in names:
                headers["Content-Length"] = str(len(body))
            if "content-type" not in names:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
    head = f"{method} {uri} {version}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1", "replace") + b"\r\n" + body


def load_cases(checkout: Path) -> list[Case]:
    cases: list[Case] = []
    for path in sorted((checkout / "tests" / "regression" / "tests").glob("*/*.yaml")):
        group = path.parent.name.split("-")[1] if "-" in path.parent.name else "?"
        doc = yaml.safe_load(path.read_text(errors="replace"))
        if not doc or not doc.get("meta", {}).get("enabled", True):
            continue
        for test in doc.get("tests") or []:
            for n, item in enumerate(test.get("stages") or []):
                stage = item.get("stage", item)
                out = stage.get("output") or {}
                want, attack = out.get("log_contains"), True
                if want is None:
                    want, attack = out.get("no_log_contains"), False
                m = _ID.search(str(want)) if want is not None else None
                if m is None:
                    continue  # status-only tests: not about a rule
                title = f"{test.get('test_title', path.stem)}#{n}"
                req = _request(stage.get("input") or {})
                cases.append(Case(title, group, int(m.group(1)), attack, req))
    return cases


def send(port: int, data: bytes) -> tuple[int, str | None]:
    """One request on its own connection: (status, X-Request-Id); status 0 if no answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT_S) as sock:
            sock.settimeout(ANSWER_TIMEOUT_S)
            sock.sendall(data)
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            with contextlib.suppress(OSError, http.client.HTTPException):
                resp.read()
            return resp.status, resp.getheader("X-Request-Id")
    except (OSError, http.client.HTTPException):
        return 0, None


def replay(port: int, log_path: Path, cases: list[Case]) -> list[Outcome]:
    sent = [send(port, case.request) for case in cases]
    time.sleep(0.5)  # the last log lines: Portico's logger writes each record at once
    fired: dict[str, set[int]] = {}
    for m in _LOG.finditer(log_path.read_text(errors="replace")):
        fired[m.group(1)] = {int(r) for r in m.group(2).split(",")}
    return [Outcome(status, fired.get(rid or "", set())) for status, rid in sent]


class _Ok(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        return None


@contextlib.contextmanager
def backend() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def portico(backend_port: int, paranoia: int, tmp: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    cfg = tmp / f"pl{paranoia}.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nshutdown_grace = 0.5\n\n'
        "[request_id]\nenabled = true\n\n"
        f'[upstreams.app]\nbackends = ["http://127.0.0.1:{backend_port}"]\n\n'
        f'[[routes]]\npath = "/"\nupstream = "app"\nwaf = {{ paranoia_level = {paranoia} }}\n'
    )
    log = tmp / f"pl{paranoia}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "portico", "serve", "-c", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"portico did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield port, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize(
    cases: list[Case], outcomes: list[Outcome], levels: dict[int, int], paranoia: int
) -> list[str]:
    rows: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for case, out in zip(cases, outcomes, strict=True):
        c = rows[case.group]
        active = levels.get(case.rule, 1) <= paranoia
        fired = case.rule in out.rules
        if case.attack:
            c["attacks"] += 1
            c["active"] += active
            c["fired_active"] += active and fired
            c["blocked"] += out.status == 403
            c["parser"] += out.status == 400
            c["noanswer"] += out.status == 0
        else:
            c["clean"] += 1
            c["fp"] += fired
            c["clean_blocked"] += out.status == 403
    lines = [
        f"Paranoia level {paranoia}:",
        "",
        "| class | attack cases | rule active at this PL | of those, rule matched "
        "| blocked 403 (all) | refused 400 by the parser | clean cases | rule matched (FP) "
        "| clean blocked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total: collections.Counter[str] = collections.Counter()
    for group in sorted(rows):
        c = rows[group]
        total.update(c)
        lines.append(_row(f"{group} {CLASSES.get(group, '')}", c))
    lines.append(_row("**all**", total))
    return lines


def _row(label: str, c: collections.Counter[str]) -> str:
    return (
        f"| {label} | {c['attacks']} | {c['active']} | {c['fired_active']} | {c['blocked']} "
        f"| {c['parser']} | {c['clean']} | {c['fp']} | {c['clean_blocked']} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkout", type=Path, help="a coreruleset checkout (tag v3.3.4)")
    p.add_argument("--paranoia", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rules", default=CRS_RULES, help="the CRS rules Portico loads")
    p.add_argument("--url", help="a running Portico (its WAF's level: the first --paranoia)")
    p.add_argument("--log", type=Path, help="that Portico's log file (with --url)")
    p.add_argument("--out", type=Path, help="also write the tables here (markdown)")
    args = p.parse_args(argv)
    cases = load_cases(args.checkout)
    if not cases:
        print(f"no test cases under {args.checkout}/tests/regression/tests", file=sys.stderr)
        return 2
    levels = rule_levels(args.rules)
    attacks = sum(c.attack for c in cases)
    lines = [
        f"{len(cases)} test stages from {args.checkout.name}: {attacks} attack cases, "
        f"{len(cases) - attacks} clean cases.",
        "",
    ]
    if args.url:
        if args.log is None:
            p.error("--url needs --log")
        port = int(args.url.rsplit(":", 1)[1].split("/")[0])
        lines += summarize(cases, replay(port, args.log, cases), levels, args.paranoia[0])
    else:
        with backend() as backend_port, tempfile.TemporaryDirectory() as tmp:
            for level in args.paranoia:
                started = time.monotonic()
                with portico(backend_port, level, Path(tmp)) as (port, log):
                    outcomes = replay(port, log, cases)
                print(f"PL{level}: {time.monotonic() - started:.0f}s", file=sys.stderr)
                lines += [*summarize(cases, outcomes, levels, level), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
