#!/usr/bin/env bash
# Start trytond (JSON-RPC over HTTP) on the database created by setup.py.
#
#   scripts/tryton/serve.sh [--wait] [DATA_DIR] [HOST:PORT]
#
# DATA_DIR: $CAUSEWAY_TRYTON_DIR or /tmp/causeway-tryton (must contain trytond.conf
#           and causeway.sqlite from setup.py). HOST:PORT: $CAUSEWAY_TRYTON_LISTEN or
#           127.0.0.1:8000 (overrides [web] listen via TRYTOND_WEB__LISTEN).
# Without --wait the script execs trytond in the foreground (its pid is this script's
# pid, so `serve.sh & pid=$!; ...; kill $pid` works). With --wait it starts trytond in
# the background, writes DATA_DIR/trytond.pid, waits until JSON-RPC answers (max 30 s),
# prints the pid and exits 0 (1 on timeout). Server log: DATA_DIR/trytond.log.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${CAUSEWAY_TRYTON_VENV:-$HERE/../../.venv-tryton}"
WAIT=0
if [[ "${1:-}" == "--wait" ]]; then WAIT=1; shift; fi
DIR="${1:-${CAUSEWAY_TRYTON_DIR:-/tmp/causeway-tryton}}"
LISTEN="${2:-${CAUSEWAY_TRYTON_LISTEN:-127.0.0.1:8000}}"
DB="${CAUSEWAY_TRYTON_DB:-causeway}"
[[ -f "$DIR/trytond.conf" && -f "$DIR/$DB.sqlite" ]] || {
  echo "serve.sh: $DIR/trytond.conf or $DIR/$DB.sqlite missing; run setup.py first" >&2; exit 2; }
export TRYTOND_WEB__LISTEN="$LISTEN"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"
CMD=("$VENV/bin/trytond" -c "$DIR/trytond.conf" -d "$DB")
if [[ $WAIT == 0 ]]; then exec "${CMD[@]}"; fi

"${CMD[@]}" >>"$DIR/trytond.log" 2>&1 &
PID=$!
echo "$PID" >"$DIR/trytond.pid"
URL="http://$LISTEN/"
for _ in $(seq 1 300); do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "serve.sh: trytond exited; see $DIR/trytond.log" >&2; tail -20 "$DIR/trytond.log" >&2; exit 1
  fi
  if "$VENV/bin/python" - "$URL" <<'PY' 2>/dev/null; then echo "$PID"; exit 0; fi
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], json.dumps(
    {"id": 0, "method": "common.server.version", "params": []}).encode(),
    {"Content-Type": "application/json"})
sys.exit(0 if "result" in json.load(urllib.request.urlopen(req, timeout=1)) else 1)
PY
  sleep 0.1
done
echo "serve.sh: trytond not ready after 30 s; see $DIR/trytond.log" >&2
kill "$PID" 2>/dev/null || true
exit 1
