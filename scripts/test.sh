#!/usr/bin/env bash
# Installs everything the tests need into .venv and runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k codec`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check src tests bench examples
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
