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
# The WAF tests (tests/integration/test_waf.py, tests/unit/test_waf_rules.py) load the OWASP
# Core Rule Set from Debian's modsecurity-crs; libmodsecurity3 is the system library (the PyPI
# binding in the waf extra bundles its own build). As root with apt-get, install them when
# missing; if that fails the WAF tests skip with the reason.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && ! dpkg-query -W -f='${Status}' modsecurity-crs 2>/dev/null | grep -q "ok installed"; then
  echo "installing modsecurity-crs and libmodsecurity3 for the WAF tests" >&2
  { apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmodsecurity3 modsecurity-crs \
      >/dev/null; } \
    || echo "could not install modsecurity-crs libmodsecurity3: WAF tests will skip" >&2
fi
# The browser tests (tests/integration/test_cors_browser.py) drive Debian's chromium through
# Playwright (never `playwright install`). As root with apt-get, install it when missing; if
# that fails they skip.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium for the browser tests" >&2
  { apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "could not install chromium: browser tests will skip" >&2
fi
# The ACME tests (tests/integration/test_acme_pebble.py) run Pebble, Let's Encrypt's test CA,
# with pebble-challtestsrv as its DNS; the TLS tests use curl and openssl s_client. As root
# with apt-get, install what is missing; if that fails those tests skip.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
   && { ! command -v pebble >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1 \
        || ! command -v openssl >/dev/null 2>&1; }; then
  echo "installing pebble, curl and openssl for the TLS and ACME tests" >&2
  { apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pebble curl openssl >/dev/null; } \
    || echo "could not install pebble curl openssl: ACME/TLS tool tests will skip" >&2
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
# The suite runs on both builds of the same source (docs/performance.md): the accelerated one
# (setup.py: PORTICO_COMPILE=1 compiles the hot modules with mypyc) installed, not editable,
# into .venv-fast, and the pure-Python one in .venv. The two runs go side by side (each test
# picks its own free ports and owns what it starts; most of a run is waiting on sockets), every
# line prefixed with its build, so the whole takes about as long as one run. PORTICO_BUILDS="pure"
# (or "fast") runs one of them only.
BUILDS=${PORTICO_BUILDS:-fast pure}
for build in $BUILDS; do
  case "$build" in
    fast)
      if [ ! -x .venv-fast/bin/pip ]; then
        "$PYTHON" -m venv --clear .venv-fast
      fi
      .venv-fast/bin/python -m pip install -q --disable-pip-version-check '.[test]' \
        mypy setuptools wheel
      PORTICO_COMPILE=1 .venv-fast/bin/python -m pip install -q --disable-pip-version-check \
        --no-build-isolation --no-deps --force-reinstall .
      # Fail here, not in the middle of the suite, if the compiled modules are not the ones
      # imported.
      .venv-fast/bin/python -c 'import sys, portico.dataplane.proxy as m; \
sys.exit(0 if m.__file__.endswith(".so") else "accelerated build not in use: " + m.__file__)'
      ;;
    pure) ;;
    *)
      echo "PORTICO_BUILDS: unknown build $build (fast or pure)" >&2
      exit 2
      ;;
  esac
done
pids=()
names=()
# Interrupted: stop both runs (their pytest processes stop what their tests started).
trap 'kill "${pids[@]}" 2>/dev/null; exit 130' INT TERM
for build in $BUILDS; do
  venv=.venv
  [ "$build" = fast ] && venv=.venv-fast
  echo "== suite on the $build build ($venv)" >&2
  # Each run's own pytest base directory, so the two never share a tmp_path tree.
  ( set -o pipefail
    "$venv/bin/python" -m pytest -q -p no:cacheprovider --basetemp="/tmp/portico-tests-$build-$$" \
      "$@" 2>&1 | sed -u "s/^/[$build] /" ) &
  pids+=("$!")
  names+=("$build")
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "== the ${names[$i]} build's suite failed" >&2
    status=1
  fi
done
rm -rf /tmp/portico-tests-*-$$
exit $status
