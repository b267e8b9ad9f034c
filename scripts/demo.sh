#!/usr/bin/env bash
# The main job, end to end on this machine: brings the whole system up
# (nats-server, etcd, a worker, the API, the janitor and the queue-lag
# exporter, installing what is missing),
# registers a challenge with the tcp-flag scenario, deploys an instance
# through the API — a real TCP service on loopback, started by the
# localservice provider plugin — checks that it answers, and prints the
# `nc` command that reads the instance's flag.
#
#   scripts/demo.sh          bring everything up and deploy
#   scripts/demo.sh down     destroy the demo challenge (its services stop),
#                            stop the API, worker, janitor and exporter, then
#                            the local stack
#
# First run on a fresh 2-core machine: about 15 minutes (Debian packages 1 min,
# Pulumi built from source ~10 min, the release build ~4 min); later runs take
# seconds. Caches: ~/.cache/ctf-instancer (Pulumi, plugins, compiled
# scenarios), ~/go (Go modules), target/ (Rust).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEV_DIR="${CM_DEV_DIR:-$PWD/.dev}"
RUN_DIR="$DEV_DIR/run"
LOG_DIR="$DEV_DIR/log"
API_ADDR="${CM_DEMO_API:-127.0.0.1:8080}"
API="http://$API_ADDR"
WORKER_METRICS="${CM_DEMO_WORKER_METRICS:-127.0.0.1:9464}"
JANITOR_METRICS="${CM_DEMO_JANITOR_METRICS:-127.0.0.1:9465}"
EXPORTER_METRICS="${CM_DEMO_EXPORTER_METRICS:-127.0.0.1:9466}"
JANITOR_INTERVAL="${CM_DEMO_JANITOR_INTERVAL:-10s}"
SERVICES=(cm-api cm-worker cm-janitor cm-queue-exporter)

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
  # The instances' TCP services are detached processes: destroy them through
  # the API (challenge delete destroys every instance) while it still runs.
  if curl -fsS --max-time 2 "$API/healthcheck" >/dev/null 2>&1; then
    code="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 120 -X DELETE "$API/api/v1/challenge/demo" || true)"
    case "$code" in
      200) echo "demo: destroyed challenge 'demo' and its instances" >&2 ;;
      404) ;;
      *) echo "demo: deleting challenge 'demo' answered HTTP $code; its services may still run" >&2 ;;
    esac
  fi
  for name in "${SERVICES[@]}"; do stop_service "$name"; done
  exec scripts/dev.sh down
fi

if ! scripts/dev.sh install --check >/dev/null 2>&1; then
  echo "demo: first run: installing what is missing (Debian packages ~1 min, Pulumi built from source ~10 min on 2 cores, cached afterwards)" >&2
fi
eval "$(scripts/dev.sh up)"
if [[ ! -x target/release/cm-api ]]; then
  echo "demo: building the release binaries (first time ~4-6 min on 2 cores, then seconds)" >&2
fi
cargo build --release -q --locked -p cm-api -p cm-worker -p cm-janitor -p cmctl
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
start_service cm-worker target/release/cm-worker --dev run --scenarios-dir examples --metrics-listen "$WORKER_METRICS"
# --dev: the local demo API is open (loopback only); see README "Security".
start_service cm-api target/release/cm-api --dev --listen "$API_ADDR"
start_service cm-janitor target/release/cm-janitor --interval "$JANITOR_INTERVAL" --metrics-listen "$JANITOR_METRICS"
start_service cm-queue-exporter target/release/cm-worker --dev queue-exporter --metrics-listen "$EXPORTER_METRICS"

for _ in $(seq 100); do
  curl -fsS "$API/healthcheck" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$API/healthcheck" >/dev/null || { echo "demo: the API did not come up; see $LOG_DIR/cm-api.log" >&2; exit 1; }

call() { curl -sS -X "$1" "$API$2" -H 'content-type: application/json' ${3:+--data "$3"}; }
status_of() { curl -sS -o /dev/null -w '%{http_code}' -X "$1" "$API$2" -H 'content-type: application/json' ${3:+--data "$3"}; }

echo "demo: registering challenge 'demo' (scenario examples/tcp-flag: one TCP service on loopback per instance, 1h timeout)" >&2
code="$(status_of POST /api/v1/challenge '{"id":"demo","scenario":"tcp-flag","timeout":"3600s"}')"
case "$code" in
  200) ;;
  409) # registered by an earlier run, maybe with another scenario
    call PATCH /api/v1/challenge/demo '{"scenario":"tcp-flag","timeout":"3600s"}' >/dev/null ;;
  *) echo "demo: registering the challenge answered HTTP $code; see $LOG_DIR/cm-worker.log" >&2; exit 1 ;;
esac
echo "demo: deploying an instance for source 'player-1'" >&2
instance="$(call POST /api/v1/instance '{"challengeId":"demo","sourceId":"player-1"}')"
if ! grep -q '"connectionInfo"' <<<"$instance"; then
  instance="$(call GET /api/v1/instance/demo/player-1)"
fi

# Reads the service's answer; prints the connection info, or fails.
check_instance() {
  python3 - "$1" <<'PY'
import json, socket, sys
i = json.loads(sys.argv[1])
info = i.get("connectionInfo")
if not info:
    sys.exit(f"demo: no instance: {i}")
try:
    _, host, port = info.split()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        answer = s.makefile().readline().strip()
except (ValueError, OSError) as e:
    sys.exit(f"demo: the service at {info!r} does not answer: {e}")
if answer not in i.get("flags", []):
    sys.exit("demo: the service answered something else than the instance's flag")
print(f"challenge:       {i['challengeId']}")
print(f"source:          {i['sourceId']}")
print(f"connection info: {info}")
print(f"until:           {i.get('until', 'never')}")
print(f"read the flag:   {info}")
PY
}
if ! check_instance "$instance"; then
  # e.g. an instance of an earlier run whose service died with the machine
  echo "demo: resetting the instance (new identity, new service)" >&2
  call POST /api/v1/instance/demo/player-1/reset >/dev/null
  instance="$(call GET /api/v1/instance/demo/player-1)"
  check_instance "$instance"
fi
cat >&2 <<EOF

demo: the whole system runs (logs in $LOG_DIR):
  API            $API            (try: curl $API/api/v1/instance/demo/player-1)
  metrics        API $API/metrics, worker http://$WORKER_METRICS/metrics,
                 janitor http://$JANITOR_METRICS/metrics, queue lag http://$EXPORTER_METRICS/metrics
  queue          CM_NATS_URL=$CM_NATS_URL target/release/cmctl queue status
  janitor        expires instances past their 'until' every $JANITOR_INTERVAL
  stop it all    scripts/demo.sh down
EOF
