#!/usr/bin/env bash
# Installs everything the tests need into .venv and runs the whole suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k codec`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The container tests (tests/integration/test_docker.py) start a private dockerd and import a
# busybox image. As root with apt-get, install what is missing, once; if that fails the tests
# are reported as skipped, with the reason, and the rest of the suite runs.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1 \
     || ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed"; then
    echo "installing docker.io and busybox-static for the container tests" >&2
    { apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io busybox-static \
        >/dev/null; } \
      || echo "could not install docker.io busybox-static: container tests will skip" >&2
  fi
fi
# The shared rate-limit tests (tests/integration/test_traffic_redis.py) start their own
# redis-server. As root with apt-get, install it when missing; if that fails they skip.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server for the shared rate-limit tests" >&2
  { apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
    || echo "could not install redis-server: shared rate-limit tests will skip" >&2
fi
# The metrics tests (tests/unit/test_metrics.py, tests/integration/test_metrics.py) check every
# exposition with promtool, from the Debian package prometheus. As root with apt-get, install
# it when missing; if that fails the promtool checks skip.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && ! command -v promtool >/dev/null 2>&1; then
  echo "installing prometheus (promtool) for the metrics tests" >&2
  { apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
       >/dev/null; } \
    || echo "could not install prometheus: the promtool checks will skip" >&2
fi
# The dashboard test (tests/integration/test_dashboard.py) drives Debian's chromium through
# Playwright (no browser download). As root with apt-get, install it when missing; if that
# fails the dashboard test skips.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  echo "installing chromium for the dashboard test" >&2
  { apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "could not install chromium: the dashboard test will skip" >&2
fi
# Debian and Ubuntu ship Python without venv's ensurepip (package python3-venv).
if ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing python3-venv" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "$PYTHON has no venv support: apt install python3-venv (as root) first" >&2
    exit 1
  fi
fi
# A .venv without pip is what a failed `python3 -m venv` leaves behind: make it again.
if [ ! -x .venv/bin/pip ]; then
  "$PYTHON" -m venv --clear .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check src tests bench examples
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
