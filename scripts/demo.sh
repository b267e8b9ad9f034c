#!/usr/bin/env bash
# The main job, end to end on this machine: brings the whole system up
# (nats-server, etcd, a worker and the API, installing what is missing),
# registers a challenge, deploys an instance through the API and prints its
# connection info.
#
#   scripts/demo.sh          bring everything up and deploy
#   scripts/demo.sh down     stop the API and worker, then the local stack
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEV_DIR="${CM_DEV_DIR:-$PWD/.dev}"
RUN_DIR="$DEV_DIR/run"
LOG_DIR="$DEV_DIR/log"
API_ADDR="${CM_DEMO_API:-127.0.0.1:8080}"
API="http://$API_ADDR"

stop_service() {
  local name="$1" pid_file="$RUN_DIR/$1.pid"
  [[ -f "$pid_file" ]] || return 0
  local pid
  pid="$(cat "$pid_file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
  echo "demo: stopped $name" >&2
}

if [[ "${1:-}" == "down" ]]; then
  stop_service cm-api
  stop_service cm-worker
  exec scripts/dev.sh down
fi

eval "$(scripts/dev.sh up)"
cargo build --release -q -p cm-api -p cm-worker
mkdir -p "$RUN_DIR" "$LOG_DIR"

start_service() {
  local name="$1"; shift
  local pid_file="$RUN_DIR/$name.pid"
  if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "demo: $name already running (pid $(cat "$pid_file"))" >&2
    return
  fi
  nohup "$@" </dev/null >>"$LOG_DIR/$name.log" 2>&1 &
  echo $! >"$pid_file"
  echo "demo: started $name (pid $!, log $LOG_DIR/$name.log)" >&2
}

export CM_NATS_URL CM_ETCD_ENDPOINTS
start_service cm-worker target/release/cm-worker --dev run --scenarios-dir examples
# --dev: the local demo API is open (loopback only); see README "Security".
start_service cm-api target/release/cm-api --dev --listen "$API_ADDR"

for _ in $(seq 100); do
  curl -fsS "$API/healthcheck" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$API/healthcheck" >/dev/null || { echo "demo: the API did not come up; see $LOG_DIR/cm-api.log" >&2; exit 1; }

call() { curl -sS -X "$1" "$API$2" -H 'content-type: application/json' ${3:+--data "$3"}; }

echo "demo: registering challenge 'demo' (scenario examples/identity, 1h timeout)" >&2
call POST /api/v1/challenge '{"id":"demo","scenario":"identity","timeout":"3600s"}' >/dev/null
echo "demo: deploying an instance for source 'player-1'" >&2
instance="$(call POST /api/v1/instance '{"challengeId":"demo","sourceId":"player-1"}')"
if ! grep -q '"connectionInfo"' <<<"$instance"; then
  instance="$(call GET /api/v1/instance/demo/player-1)"
fi
python3 - "$instance" <<'PY'
import json, sys
i = json.loads(sys.argv[1])
if "connectionInfo" not in i:
    sys.exit(f"demo: no instance: {i}")
print(f"challenge:       {i['challengeId']}")
print(f"source:          {i['sourceId']}")
print(f"connection info: {i['connectionInfo']}")
print(f"until:           {i.get('until', 'never')}")
PY
echo >&2
echo "demo: the API is at $API (try: curl $API/api/v1/instance/demo/player-1); stop everything with: scripts/demo.sh down" >&2
