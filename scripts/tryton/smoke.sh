#!/usr/bin/env bash
# Smoke test: fresh database (setup.py) + trytond (serve.sh --wait) + one sale round trip
# (rpc.py roundtrip: login, find C10000 and 1900-S, create, quote, confirm, find by reference).
# Exits 0 on success. Uses its own data dir and a free loopback port unless
# CAUSEWAY_TRYTON_DIR / CAUSEWAY_TRYTON_LISTEN are set. Needs the venv (see README.md).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${CAUSEWAY_TRYTON_VENV:-$HERE/../../.venv-tryton}"
PY="$VENV/bin/python"
[[ -x "$PY" ]] || { echo "smoke.sh: $PY missing; create the venv first (README.md)" >&2; exit 2; }
KEEP_DIR=1
if [[ -z "${CAUSEWAY_TRYTON_DIR:-}" ]]; then
  export CAUSEWAY_TRYTON_DIR="$(mktemp -d /tmp/causeway-tryton-smoke.XXXXXX)"; KEEP_DIR=0
fi
if [[ -z "${CAUSEWAY_TRYTON_LISTEN:-}" ]]; then
  PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  export CAUSEWAY_TRYTON_LISTEN="127.0.0.1:$PORT"
fi
PID=""
cleanup() {
  [[ -n "$PID" ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  [[ $KEEP_DIR == 0 ]] && rm -rf "$CAUSEWAY_TRYTON_DIR" || true
}
trap cleanup EXIT

t0=$(date +%s%N)
PYTHONWARNINGS=ignore::DeprecationWarning "$PY" "$HERE/setup.py" >"$CAUSEWAY_TRYTON_DIR/setup.log" 2>&1 \
  || { cat "$CAUSEWAY_TRYTON_DIR/setup.log" >&2; echo "smoke.sh: setup.py failed" >&2; exit 1; }
t1=$(date +%s%N)
PID="$("$HERE/serve.sh" --wait)"
t2=$(date +%s%N)
"$PY" "$HERE/rpc.py" roundtrip --reference "SMOKE-1"
t3=$(date +%s%N)
ms() { echo $(( ($2 - $1) / 1000000 )); }
printf 'smoke ok: setup %s ms, server ready %s ms, round trip %s ms (%s, %s)\n' \
  "$(ms "$t0" "$t1")" "$(ms "$t1" "$t2")" "$(ms "$t2" "$t3")" \
  "$CAUSEWAY_TRYTON_LISTEN" "$CAUSEWAY_TRYTON_DIR"
