"""What the security stages cost a request: req/s through one Portico worker for a route that
answers itself (``respond``), bare and with CORS, basic auth (a cached credential), JWT
RS256, ES256 and EdDSA from key files. Prints a markdown table (docs/security.md).

    python bench/auth.py [--duration 5] [--connections 32]

Needs wrk and taskset (Portico on core 0, wrk on core 1), bcrypt, PyJWT and cryptography.
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
from pathlib import Path

import bcrypt
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import procs
import wrk

KEYS = {
    "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="portico-bench-auth-"))
    htpasswd = work / "htpasswd"
    htpasswd.write_bytes(b"bench:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(10)) + b"\n")
    port = procs.free_port()
    routes = [
        '[[routes]]\npath_exact = "/none"\nrespond = { body = "ok" }\n',
        '[[routes]]\npath_exact = "/rule"\nrespond = { body = "ok" }\n'
        'response_headers = { set = { X-A = "1" } }\n',
        '[[routes]]\npath_exact = "/cors"\nrespond = { body = "ok" }\n'
        'cors = { origins = ["https://app.test"] }\n',
        '[[routes]]\npath_exact = "/basic"\nrespond = { body = "ok" }\n'
        f'auth = {{ basic = {{ htpasswd = "{htpasswd}" }} }}\n',
    ]
    tokens: dict[str, str] = {}
    for alg, key in KEYS.items():
        pem = work / f"{alg}.pem"
        pem.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ))  # fmt: skip
        routes.append(
            f'[[routes]]\npath_exact = "/{alg}"\nrespond = {{ body = "ok" }}\n'
            f'auth = {{ jwt = {{ algorithms = ["{alg}"], key_file = "{pem}" }} }}\n'
        )
        tokens[alg] = jwt.encode({"sub": "b", "exp": int(time.time()) + 3600}, key, algorithm=alg)
    config = work / "portico.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\n\n[upstreams.none]\n'
        'backends = ["http://127.0.0.1:9"]\n\n' + "\n".join(routes)
    )
    service = procs.start(
        "portico",
        procs.pinned(0, [sys.executable, "-m", "portico", "serve", "-c", str(config)]),
        work / "portico.log",
    )
    try:
        service.wait_ready(port, {"/none": 2})
        basic = base64.b64encode(b"bench:pw").decode()
        cases = [
            ("no stage", "/none", ()),
            ("one header rule (for comparison)", "/rule", ()),
            ("cors (allowed Origin)", "/cors", ("Origin: https://app.test",)),
            ("basic (cached credential)", "/basic", (f"Authorization: Basic {basic}",)),
            *(
                (f"jwt {alg}", f"/{alg}", (f"Authorization: Bearer {tok}",))
                for alg, tok in tokens.items()
            ),
        ]
        print("| route | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|")
        for label, path, headers in cases:
            url = f"http://127.0.0.1:{port}{path}"
            wrk.run(url, duration_s=1, connections=args.connections, threads=1, cpu=1,
                    headers=headers)  # warm-up (and the one bcrypt check)
            r = wrk.run(url, duration_s=args.duration, connections=args.connections, threads=1,
                        cpu=1, headers=headers)
            rps, p50, p99 = r.requests_per_s, r.p50_ms, r.p99_ms
            print(f"| {label} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {r.errors} |")
        t0 = time.perf_counter()
        bcrypt.checkpw(b"pw", htpasswd.read_bytes().split(b":", 1)[1].strip())
        print(f"\none bcrypt check (cost 10) here: {1000 * (time.perf_counter() - t0):.0f} ms")
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
