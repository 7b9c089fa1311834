"""The tutorial's Flask app: a greeting and the id of the container that answered.

Refresh the page behind Portico and the container id changes: the replicas take turns.
"""

from __future__ import annotations

import html
import socket

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index() -> str:
    # A container's host name is its short container id, as `docker ps` shows it.
    container = html.escape(socket.gethostname())
    return f"<h1>Hello from Flask</h1><p>Container ID: <code>{container}</code></p>\n"


@app.get("/health")
def health() -> tuple[str, int]:
    # Portico's readiness probe: a replica gets traffic only once this answers.
    return "ok\n", 200
