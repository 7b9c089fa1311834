"""nginx configurations for the benchmark: a fast backend and the reference reverse proxy.

Each nginx gets its own prefix directory holding its config, pid file, error log and temp
directories, so nothing under /etc/nginx or /var is read for config or written. Both run one
worker in the foreground (`daemon off;`) so the PID we start is the master we later stop.
"""

from __future__ import annotations

from pathlib import Path

SMALL_PATH = "/small"
LARGE_PATH = "/large"
# The routes case requests /svcN/small: the backend answers every path under this prefix with
# the small body, so a path-routed request costs the backend what /small costs it.
ROUTED_PREFIX = "/svc"
SMALL_SIZE = 100
LARGE_SIZE = 1024 * 1024

# Static cases (--static): files served by each server itself, and a JSON body from the
# backend compressed by each proxy with gzip at the same level.
STATIC_SMALL_PATH = "/static/small.txt"
STATIC_LARGE_PATH = "/static/large.bin"
JSON_PATH = "/data.json"
JSON_SIZE = 100 * 1024
GZIP_LEVEL = 6  # zlib's default; Portico's default for gzip, set explicitly on both sides

# `return 200 "..."` serves the small body straight from the config: no file I/O, so the
# backend stays as cheap as nginx can make it. Plain ASCII so no escaping is needed.
SMALL_BODY = "x" * SMALL_SIZE

# nginx's default closes a keep-alive connection after 1000 requests. wrk and Portico keep
# connections for the whole run, so lift the limit to compare proxying, not reconnecting.
KEEPALIVE_REQUESTS = 1_000_000

# The reference proxy's idle upstream connections, as the brief specifies.
UPSTREAM_KEEPALIVE = 64


def _common(prefix: Path) -> str:
    """Process-level directives shared by both instances."""
    return f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
"""


def _http_common(prefix: Path) -> str:
    """http-level directives: no access log, long keep-alive, temp paths inside the prefix."""
    tmp = prefix / "tmp"
    return f"""\
    access_log off;
    default_type application/octet-stream;
    keepalive_requests {KEEPALIVE_REQUESTS};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
"""


def backend_conf(prefix: Path, port: int) -> str:
    """The origin: `/small` (and anything under `/svc`) is a fixed 100-byte body, `/large` a
    1 MiB file (sendfile)."""
    return f"""\
{_common(prefix)}
http {{
{_http_common(prefix)}
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port};
        location = {SMALL_PATH} {{ return 200 "{SMALL_BODY}"; }}
        location = {LARGE_PATH} {{ root {www_dir(prefix)}; }}
        location ^~ {ROUTED_PREFIX} {{ return 200 "{SMALL_BODY}"; }}
        location = {JSON_PATH} {{ root {www_dir(prefix)}; default_type application/json; }}
        location / {{ return 404; }}
    }}
}}
"""


def proxy_conf(prefix: Path, port: int, backend_port: int) -> str:
    """The reference: a stock nginx reverse proxy with pooled upstream keep-alive."""
    return f"""\
{_common(prefix)}
http {{
{_http_common(prefix)}
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def static_conf(prefix: Path, port: int, backend_port: int) -> str:
    """The reference for --static: nginx serving files (sendfile, as its tutorials set it up)
    and proxying the JSON body with gzip on at the same level as Portico."""
    return f"""\
{_common(prefix)}
http {{
{_http_common(prefix)}
    sendfile on;
    tcp_nopush on;
    types {{ text/plain txt; application/octet-stream bin; application/json json; }}
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}
    server {{
        listen 127.0.0.1:{port};
        location /static/ {{ root {www_dir(prefix)}; etag on; }}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            gzip on;
            gzip_comp_level {GZIP_LEVEL};
            gzip_types application/json;
            gzip_proxied any;
            gzip_vary on;
        }}
    }}
}}
"""


def write_static_files(www: Path) -> None:
    """The files both static servers serve, and the JSON body the backend serves."""
    (www / "static").mkdir(parents=True, exist_ok=True)
    (www / "static").chmod(0o755)
    for name, data in (
        (STATIC_SMALL_PATH, b"s" * SMALL_SIZE),
        (STATIC_LARGE_PATH, b"l" * LARGE_SIZE),
        (JSON_PATH, json_body()),
    ):
        path = www / name.lstrip("/")
        path.write_bytes(data)
        path.chmod(0o644)


def json_body() -> bytes:
    """100 KiB of API-like JSON: records with repeating keys and varied values."""
    import json

    records = []
    i = 0
    while True:
        records.append(
            {
                "id": i,
                "name": f"user-{i * 7919 % 100003}",
                "email": f"user{i * 7919 % 100003}@example.com",
                "active": i % 3 != 0,
                "score": round((i * 2654435761 % 1000003) / 1000.0, 3),
                "tags": ["alpha", "beta", "gamma"][: i % 3 + 1],
            }
        )
        data = json.dumps(records, separators=(",", ":")).encode()
        if len(data) >= JSON_SIZE:
            return data[: JSON_SIZE - 1].rsplit(b",{", 1)[0] + b"]"
        i += 1


def www_dir(prefix: Path) -> Path:
    return prefix / "www"


def write_instance(prefix: Path, conf: str) -> Path:
    """Create the prefix tree and config file; return the config path.

    The tree is made world-readable because nginx, started as root, runs its worker as an
    unprivileged user that must still read the served files.
    """
    for directory in (prefix, prefix / "tmp", www_dir(prefix)):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
    conf_path = prefix / "nginx.conf"
    conf_path.write_text(conf)
    return conf_path


def write_large_file(prefix: Path) -> None:
    path = www_dir(prefix) / LARGE_PATH.lstrip("/")
    path.write_bytes(b"y" * LARGE_SIZE)
    path.chmod(0o644)


def command(nginx: str, prefix: Path, conf_path: Path) -> list[str]:
    """Foreground nginx with its own prefix; `-e` keeps even start-up errors in the prefix."""
    return [
        nginx,
        "-p",
        f"{prefix}/",
        "-c",
        str(conf_path),
        "-e",
        str(prefix / "error.log"),
        "-g",
        "daemon off;",
    ]
