#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build Causeway: pingora builds zlib-ng
# through cmake and a C compiler. With --test, also what the tests run beside the gateway:
# nginx, as the rate limiter in front of the real ERP (tests/integration/tryton.rs), promtool (Debian's
# prometheus package) for the alert rules, Python's venv, and PostgreSQL's and Redis's server
# binaries for the tests that run a server of their own. Failing to install them does not stop this script:
# without them those tests are skipped with a message, except under CI (`CI` or
# CAUSEWAY_REQUIRE_SERVICES set), where each such test fails naming what is missing.
set -euo pipefail
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
optional=()
if [ "${1:-}" = "--test" ]; then
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || optional+=(nginx-light)
  # promtool checks and unit-tests the shipped alert rules (tests/integration/observability.rs).
  command -v promtool >/dev/null 2>&1 || optional+=(prometheus)
  # Tryton and schemathesis run in venvs made from PyPI (tests/integration/tryton.rs).
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || optional+=(python3-venv)
  # Tests that stop and restart a database or Redis of their own (tests/integration/cluster.rs,
  # common/postgres.rs) run PostgreSQL's initdb/pg_ctl and redis-server; the shared services
  # (PostgreSQL :5432, Redis :6379, NATS :4222) are the machine's.
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || optional+=(postgresql)
  command -v redis-server >/dev/null 2>&1 || optional+=(redis-server)
  command -v psql >/dev/null 2>&1 || optional+=(postgresql-client)
fi
[ ${#missing[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
if ! command -v apt-get >/dev/null 2>&1; then
  if [ ${#missing[@]} -gt 0 ]; then
    echo "causeway: please install ${missing[*]} with your package manager, then retry" >&2
    exit 1
  fi
  echo "causeway: ${optional[*]} not installed: the tests that need it will be skipped" >&2
  exit 0
fi
echo "causeway: installing ${missing[*]} ${optional[*]}" >&2
$sudo apt-get update -qq || true
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
if [ ${#optional[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${optional[@]}" ||
    echo "causeway: could not install ${optional[*]}: the tests that need it will be skipped" >&2
fi
