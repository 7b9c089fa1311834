#!/usr/bin/env bash
# The README's demo on a fresh machine: a virtual environment (.venv, made once) with Portico
# and its demo extra (Flask, gunicorn), then three instances of examples/flask-app behind
# http://127.0.0.1:8080/ (LISTEN=host:port to change it). Ctrl-C stops everything.
# Needs Python 3.11 or newer with venv; on Debian and Ubuntu: apt install python3-venv.
# Extra arguments go to `portico run` (e.g. --workers 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "Portico needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1 || echo missing)" >&2
  exit 1
fi
# A .venv without pip is what a failed `python3 -m venv` leaves behind: make it again.
if [ ! -x .venv/bin/pip ]; then
  "$PYTHON" -m venv --clear .venv || {
    echo "could not create .venv: on Debian and Ubuntu, apt install python3-venv first" >&2
    exit 1
  }
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[demo]'
exec .venv/bin/portico run --listen "${LISTEN:-127.0.0.1:8080}" \
  --wsgi app:app --cwd examples/flask-app --min 3 --max 8 --target 2 "$@"
