"""A small Flask app to put behind portico: in demos it shows which instance answered, in tests
its JSON endpoints report exactly what arrived.

Run it under gunicorn (what the tests do)::

    INSTANCE=a python -m gunicorn --chdir examples/flask-app -b 127.0.0.1:5001 app:app

or with Flask's development server::

    python examples/flask-app/app.py --port 5001

The request counter is per process and skips ``/health``, so health probes from a proxy do not
disturb the counts a test uses to check how requests were balanced.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import itertools
import os
import time
from collections.abc import Iterator

from flask import Flask, Response, g, jsonify, request

app = Flask(__name__)

# Read in 64 KiB pieces: large enough to be quick, small enough that a multi-gigabyte upload
# never sits in memory.
READ_CHUNK = 64 * 1024

# /bytes pattern: byte i of the body is i % 256. The block is a multiple of 256 bytes long, so
# every slice of it that starts at a block boundary continues the pattern.
_PATTERN_BLOCK = bytes(range(256)) * (READ_CHUNK // 256)

# itertools.count's next() is atomic under the GIL, so gthread workers need no lock.
_counter = itertools.count(1)


def instance_name() -> str:
    # INSTANCE when started by hand or a test; PORTICO_INSTANCE when `portico run` started it.
    name = os.environ.get("INSTANCE") or os.environ.get("PORTICO_INSTANCE")
    return name or f"port-{server_port()}"


def server_port() -> int:
    # The listening socket's port (gunicorn and werkzeug set it from the socket, not from Host).
    return int(request.environ.get("SERVER_PORT", "0") or 0)


def raw_target() -> str:
    """The request target as sent, query string included and not re-encoded."""
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    query = request.query_string.decode("latin-1")
    return request.path + (f"?{query}" if query else "")


@app.before_request
def _count_request() -> None:
    if request.path != "/health":
        g.count = next(_counter)


def _whoami() -> dict[str, object]:
    count = g.get("count", 0)  # this request's number in this process
    return {"instance": instance_name(), "pid": os.getpid(), "port": server_port(), "count": count}


@app.get("/")
def index() -> str:
    me = _whoami()
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in me.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(str(me['instance']))}</title></head>"
        f"<body><h1>Answered by {html.escape(str(me['instance']))}</h1>"
        f"<table>{rows}</table></body></html>"
    )


@app.get("/whoami")
def whoami() -> Response:
    return jsonify(_whoami())


@app.route("/echo", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])
def echo() -> Response:
    digest = hashlib.sha256()
    length = 0
    # request.stream works for Content-Length and chunked bodies (gunicorn sets
    # wsgi.input_terminated) and never buffers the whole body.
    while chunk := request.stream.read(READ_CHUNK):
        digest.update(chunk)
        length += len(chunk)
    return jsonify(
        method=request.method,
        path=raw_target(),
        query=request.query_string.decode("latin-1"),
        headers=dict(request.headers),
        body_length=length,
        body_sha256=digest.hexdigest(),
        **_whoami(),
    )


@app.get("/headers")
def headers() -> Response:
    return jsonify(dict(request.headers))


@app.route("/status/<int:code>", methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
def status(code: int) -> Response:
    body = b"" if code in (204, 304) or code < 200 else f"status {code}\n".encode()
    return Response(body, status=code, mimetype="text/plain")


@app.get("/sleep/<seconds>")
def sleep(seconds: str) -> Response:
    try:
        delay = float(seconds)
    except ValueError:
        return Response("seconds must be a number\n", status=400, mimetype="text/plain")
    time.sleep(delay)
    return jsonify(slept=delay, **_whoami())


@app.get("/bytes/<int:n>")
def stream_bytes(n: int) -> Response:
    """n bytes where byte i is i % 256, generated in pieces.

    Without ``?cl=1`` no Content-Length is set, so an HTTP/1.1 server sends it chunked.
    """

    def generate() -> Iterator[bytes]:
        left = n
        while left > 0:
            piece = _PATTERN_BLOCK[: min(left, len(_PATTERN_BLOCK))]
            left -= len(piece)
            yield piece

    response = Response(generate(), mimetype="application/octet-stream")
    if request.args.get("cl") == "1":
        response.headers["Content-Length"] = str(n)
    return response


@app.get("/health")
def health() -> Response:
    return Response("ok", mimetype="text/plain")


def main() -> None:
    parser = argparse.ArgumentParser(description="Development server for the demo app.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5001")))
    args = parser.parse_args()
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
