#!/usr/bin/env bash
# Local development stack for ctf-instancer, run as plain processes on loopback
# (no Docker): a NATS server with JetStream and a single-node etcd, plus the
# Pulumi CLI built by scripts/install-pulumi.sh.
#
# Usage: scripts/dev.sh <install|up|down [--purge]|status|env|help>
# Run `scripts/dev.sh help` for the details and the environment variables.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd -P)"

NATS_PORT="${CM_DEV_NATS_PORT:-4222}"
NATS_MONITOR_PORT="${CM_DEV_NATS_MONITOR_PORT:-8222}"
ETCD_PORT="${CM_DEV_ETCD_PORT:-2379}"
ETCD_PEER_PORT="${CM_DEV_ETCD_PEER_PORT:-2380}"
DEV_DIR="${CM_DEV_DIR:-$REPO_ROOT/.dev}"
READY_TIMEOUT="${CM_DEV_TIMEOUT:-30}"
STOP_TIMEOUT=10
HOST=127.0.0.1

DATA_DIR="$DEV_DIR/data"
LOG_DIR="$DEV_DIR/log"
RUN_DIR="$DEV_DIR/run"
PULUMI_DIR_FILE="$DEV_DIR/pulumi-bin-dir"

NATS_URL="nats://$HOST:$NATS_PORT"
NATS_MONITOR_URL="http://$HOST:$NATS_MONITOR_PORT"
ETCD_URL="http://$HOST:$ETCD_PORT"
ETCD_PEER_URL="http://$HOST:$ETCD_PEER_PORT"

SERVICES=(nats etcd)

log() { echo "dev.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  cat <<EOF
Usage: scripts/dev.sh <command>

Brings up the local stack on loopback as plain processes: nats-server with
JetStream and a single-node etcd. Data, logs and pid files live in \$CM_DEV_DIR.

Commands:
  install       Install what is missing, quietly when everything is present:
                the Debian packages nats-server, etcd-server (/usr/bin/etcd) and
                protobuf-compiler (protoc), prometheus and prometheus-alertmanager
                (used by the monitoring tests), netcat-openbsd (nc, to talk to
                the demo's TCP service), docker-registry (the OCI registry the
                scenario-source tests push to; its systemd service is not
                used) with apt-get (apt-get update first only
                when something is missing), then the Pulumi CLI and its Go
                language host via scripts/install-pulumi.sh (cached; the first
                build takes minutes), then the project's provider plugins
                (providers/*, e.g. pulumi-resource-localservice) into the same
                bin directory via scripts/install-providers.sh (cached by
                source digest).
  up            install, then start nats-server and etcd unless already running
                (pid file + live process), wait until both answer their health
                checks (at most \$CM_DEV_TIMEOUT s, the log tail is shown on
                failure), print where they listen and the export lines.
                Running it again leaves one process of each. Its stdout is only
                '#' comments and export lines, so eval "\$(scripts/dev.sh up)"
                works too.
  down [--purge]
                Stop what 'up' started (SIGTERM, up to ${STOP_TIMEOUT} s, then SIGKILL) and
                remove the pid files. Data is kept; --purge also deletes the data
                and logs under \$CM_DEV_DIR.
  status        Tell for each service whether it runs, its pid, where it
                listens and whether it answers. Exit status 0 when all run and
                answer, 3 otherwise.
  env           Print only the export lines, for: eval "\$(scripts/dev.sh env)"
                  CM_NATS_URL        $NATS_URL
                  CM_ETCD_ENDPOINTS  $ETCD_URL
                  PATH               prefixed with the Pulumi bin directory
                                     (when Pulumi has been built)
  help, --help  This text.

Environment:
  CM_DEV_DIR                 state directory (default: <repo>/.dev, now $DEV_DIR)
  CM_DEV_NATS_PORT           NATS client port (default 4222)
  CM_DEV_NATS_MONITOR_PORT   NATS HTTP monitoring port (default 8222)
  CM_DEV_ETCD_PORT           etcd client port (default 2379)
  CM_DEV_ETCD_PEER_PORT      etcd peer port (default 2380)
  CM_DEV_TIMEOUT             readiness timeout in seconds (default 30)
  CM_DEV_SKIP_PULUMI=1       skip scripts/install-pulumi.sh in install/up (e.g.
                             while a Pulumi build already runs elsewhere, or in
                             jobs that do not need Pulumi)
  PULUMI_VERSION, PULUMI_GO_HOST_VERSION, CM_CACHE_DIR
                             passed through to scripts/install-pulumi.sh

Everything listens on 127.0.0.1 only. The same ports must be free: a system
etcd or nats-server service (e.g. started by the Debian package under systemd)
has to be stopped first.
EOF
}

# ---------------------------------------------------------------- install --

# Path of a command, also looking in the sbin directories (nats-server is
# installed in /usr/sbin, which a non-root PATH may lack).
find_bin() {
  local name="$1" dir
  if command -v "$name" >/dev/null 2>&1; then
    command -v "$name"
    return 0
  fi
  for dir in /usr/sbin /usr/local/sbin /sbin; do
    if [[ -x "$dir/$name" ]]; then
      echo "$dir/$name"
      return 0
    fi
  done
  return 1
}

as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

install_packages() {
  # package:command pairs
  local pairs=(nats-server:nats-server etcd-server:etcd protobuf-compiler:protoc
    prometheus:prometheus prometheus-alertmanager:amtool bsdutils:script
    netcat-openbsd:nc docker-registry:docker-registry)
  local missing=() pair
  for pair in "${pairs[@]}"; do
    find_bin "${pair#*:}" >/dev/null || missing+=("${pair%%:*}")
  done
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null 2>&1 ||
    die "missing ${missing[*]} and no apt-get here; install them by hand"
  log "installing Debian packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  for pair in "${pairs[@]}"; do
    find_bin "${pair#*:}" >/dev/null ||
      die "package ${pair%%:*} installed but '${pair#*:}' still not found"
  done
}

# Waits while another scripts/install-pulumi.sh runs (e.g. a build started by
# hand), so that we never run two builds into the same cache at once.
wait_for_other_pulumi_build() {
  command -v pgrep >/dev/null 2>&1 || return 0
  local pids announced=0
  while pids="$(pgrep -f '(^|/)bash .*install-pulumi\.sh' | grep -vx "$$" || true)"; [[ -n "$pids" ]]; do
    if ((announced == 0)); then
      log "waiting for a running install-pulumi.sh to finish (pid ${pids//$'\n'/ })"
      announced=1
    fi
    sleep 2
  done
}

install_pulumi() {
  if [[ "${CM_DEV_SKIP_PULUMI:-0}" == 1 ]]; then
    return 0
  fi
  wait_for_other_pulumi_build
  local bin_dir
  bin_dir="$("$SCRIPT_DIR/install-pulumi.sh")" || die "scripts/install-pulumi.sh failed"
  bin_dir="$(tail -n 1 <<<"$bin_dir")"
  [[ -x "$bin_dir/pulumi" ]] || die "install-pulumi.sh printed '$bin_dir' without a pulumi binary in it"
  # The project's own provider plugins (providers/*), beside pulumi so that
  # the engine finds them on the PATH the worker gives it; cached by digest.
  "$SCRIPT_DIR/install-providers.sh" "$bin_dir" >/dev/null || die "scripts/install-providers.sh failed"
  mkdir -p "$DEV_DIR"
  echo "$bin_dir" >"$PULUMI_DIR_FILE"
}

cmd_install() {
  install_packages
  install_pulumi
}

# Pulumi bin directory without building anything: the one recorded by the last
# install, else the newest complete build in the cache.
pulumi_bin_dir() {
  local dir cache candidates
  if [[ -f "$PULUMI_DIR_FILE" ]]; then
    dir="$(<"$PULUMI_DIR_FILE")"
    if [[ -x "$dir/pulumi" ]]; then
      echo "$dir"
      return 0
    fi
  fi
  cache="${CM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ctf-instancer}"
  candidates="$(ls -1dt "$cache"/pulumi/*/bin 2>/dev/null || true)"
  while IFS= read -r dir; do
    [[ -n "$dir" && -x "$dir/pulumi" && -x "$dir/pulumi-language-go" ]] || continue
    echo "$dir"
    return 0
  done <<<"$candidates"
  return 1
}

# -------------------------------------------------------------- processes --

pid_file() { echo "$RUN_DIR/$1.pid"; }
log_file() { echo "$LOG_DIR/$1.log"; }

service_comm() {
  case "$1" in
    nats) echo nats-server ;;
    etcd) echo etcd ;;
  esac
}

# Prints the pid of a running service started by us, or fails.
running_pid() {
  local svc="$1" file pid comm
  file="$(pid_file "$svc")"
  [[ -f "$file" ]] || return 1
  pid="$(<"$file")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a recycled pid that now belongs to another program.
  if [[ -r "/proc/$pid/comm" ]]; then
    comm="$(<"/proc/$pid/comm")"
  else
    comm="$(ps -o comm= -p "$pid" 2>/dev/null || true)"
  fi
  [[ "$comm" == "$(service_comm "$svc")" ]] || return 1
  echo "$pid"
}

port_in_use() {
  (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

nats_healthy() {
  # /healthz?js-enabled-only=true answers ok once JetStream is up; check /jsz
  # too, so that a server without JetStream is never taken for ready.
  curl -fsS --max-time 2 "$NATS_MONITOR_URL/healthz?js-enabled-only=true" >/dev/null 2>&1 &&
    curl -fsS --max-time 2 "$NATS_MONITOR_URL/jsz" 2>/dev/null | grep -q '"config"'
}

etcd_healthy() {
  # etcd 3.4 answers {"health":"true"} (a string); later versions may add fields.
  curl -fsS --max-time 2 "$ETCD_URL/health" 2>/dev/null | grep -Eq '"health":[[:space:]]*"?true'
}

service_healthy() { "$1_healthy"; }

service_ports() {
  case "$1" in
    nats) echo "$NATS_PORT $NATS_MONITOR_PORT" ;;
    etcd) echo "$ETCD_PORT $ETCD_PEER_PORT" ;;
  esac
}

service_where() {
  case "$1" in
    nats) echo "client $NATS_URL, monitoring $NATS_MONITOR_URL, JetStream store $DATA_DIR/nats" ;;
    etcd) echo "client $ETCD_URL, peer $ETCD_PEER_URL, data $DATA_DIR/etcd" ;;
  esac
}

# Sets the array CMD to the command line that starts a service.
set_service_cmd() {
  case "$1" in
    nats)
      CMD=("$(find_bin nats-server || echo nats-server)" -js -a "$HOST"
        -p "$NATS_PORT" -m "$NATS_MONITOR_PORT" -sd "$DATA_DIR/nats")
      ;;
    etcd)
      # etcd 3.4: the initial-cluster flags only matter when the data dir is
      # new; capnslog (its default logger) is deprecated, so use zap.
      # etcd 3.4 refuses to start on arm64 unless ETCD_UNSUPPORTED_ARCH says so.
      case "$(uname -m)" in
        aarch64 | arm64) export ETCD_UNSUPPORTED_ARCH=arm64 ;;
      esac
      CMD=("$(find_bin etcd || echo etcd)" --name dev --data-dir "$DATA_DIR/etcd"
        --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL"
        --listen-peer-urls "$ETCD_PEER_URL" --initial-advertise-peer-urls "$ETCD_PEER_URL"
        --initial-cluster "dev=$ETCD_PEER_URL" --initial-cluster-state new
        --initial-cluster-token ctf-instancer-dev --logger zap --log-outputs stderr)
      ;;
  esac
}

show_log_tail() {
  local file
  file="$(log_file "$1")"
  if [[ -s "$file" ]]; then
    log "last lines of $file:"
    tail -n 25 "$file" | sed 's/^/    /' >&2
  fi
}

stop_pid() {
  local pid="$1" name="$2" deadline
  kill -TERM "$pid" 2>/dev/null || return 0
  deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "$name (pid $pid) still running after ${STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  # Reap it if it is our child (only when a start failed in this run).
  wait "$pid" 2>/dev/null || true
}

start_service() {
  local svc="$1" pid port logf
  local -a CMD
  if pid="$(running_pid "$svc")"; then
    log "$svc already running (pid $pid)"
    return 0
  fi
  rm -f "$(pid_file "$svc")"
  mkdir -p "$DATA_DIR/$svc" "$LOG_DIR" "$RUN_DIR"
  logf="$(log_file "$svc")"
  [[ -f "$logf" ]] && mv -f "$logf" "$logf.1"
  set_service_cmd "$svc"
  [[ -x "${CMD[0]}" ]] || die "$svc: ${CMD[0]} not found; run: scripts/dev.sh install"
  log "starting $svc: ${CMD[*]}"
  # nohup + own stdio: the server outlives this script; fd 9 (our lock) closed.
  nohup "${CMD[@]}" </dev/null >"$logf" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$(pid_file "$svc")"
}

# Fails before anything starts when a port of a service that is not running
# (as ours) is taken, e.g. by a system etcd or nats-server.
check_ports_free() {
  local svc port
  for svc in "${SERVICES[@]}"; do
    running_pid "$svc" >/dev/null && continue
    for port in $(service_ports "$svc"); do
      if port_in_use "$port"; then
        die "$svc: port $port on $HOST is already in use by a process that dev.sh did not start (a system service? see: ss -ltnp 'sport = :$port'; or pick other ports with CM_DEV_*_PORT)"
      fi
    done
  done
}

wait_ready() {
  local svc="$1" pid deadline
  pid="$(<"$(pid_file "$svc")")"
  deadline=$((SECONDS + READY_TIMEOUT))
  until service_healthy "$svc"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$(pid_file "$svc")"
      show_log_tail "$svc"
      die "$svc exited during startup (see $(log_file "$svc")); scripts/dev.sh down stops the rest"
    fi
    if ((SECONDS >= deadline)); then
      log "$svc not ready after ${READY_TIMEOUT}s, stopping it"
      stop_pid "$pid" "$svc"
      rm -f "$(pid_file "$svc")"
      show_log_tail "$svc"
      die "$svc did not become ready within ${READY_TIMEOUT}s (see $(log_file "$svc")); scripts/dev.sh down stops the rest"
    fi
    sleep 0.2
  done
}

take_lock() {
  mkdir -p "$DEV_DIR"
  command -v flock >/dev/null 2>&1 || return 0
  exec 9>"$DEV_DIR/.lock"
  flock -w 900 9 || die "another dev.sh up/down holds $DEV_DIR/.lock"
}

# ---------------------------------------------------------------- commands --

print_env() {
  local bin_dir
  printf 'export CM_NATS_URL=%q\n' "$NATS_URL"
  printf 'export CM_ETCD_ENDPOINTS=%q\n' "$ETCD_URL"
  if bin_dir="$(pulumi_bin_dir)"; then
    # $PATH stays literal: it is expanded by the shell that evaluates this.
    # shellcheck disable=SC2016
    printf 'export PATH=%q:"$PATH"\n' "$bin_dir"
  else
    log "note: Pulumi not built yet (run scripts/dev.sh install); PATH left as is"
  fi
}

cmd_up() {
  take_lock
  cmd_install
  local svc
  check_ports_free
  for svc in "${SERVICES[@]}"; do
    start_service "$svc"
  done
  for svc in "${SERVICES[@]}"; do
    wait_ready "$svc"
  done
  for svc in "${SERVICES[@]}"; do
    echo "# $svc: pid $(running_pid "$svc"); $(service_where "$svc"); log $(log_file "$svc")"
  done
  echo "# for your shell: eval \"\$(scripts/dev.sh env)\""
  print_env
}

cmd_down() {
  local purge=0 arg svc pid file
  for arg in "$@"; do
    case "$arg" in
      --purge) purge=1 ;;
      *) die "down: unknown argument '$arg' (only --purge)" ;;
    esac
  done
  [[ -d "$DEV_DIR" ]] || { log "nothing to stop ($DEV_DIR does not exist)"; return 0; }
  take_lock
  for svc in "${SERVICES[@]}"; do
    file="$(pid_file "$svc")"
    if pid="$(running_pid "$svc")"; then
      log "stopping $svc (pid $pid)"
      stop_pid "$pid" "$svc"
    elif [[ -f "$file" ]]; then
      log "$svc not running (stale pid file removed)"
    else
      log "$svc not running"
    fi
    rm -f "$file"
  done
  if ((purge)); then
    log "purging $DATA_DIR and $LOG_DIR"
    rm -rf "$DATA_DIR" "$LOG_DIR" "$RUN_DIR" "$PULUMI_DIR_FILE"
    rm -f "$DEV_DIR/.lock"
    rmdir "$DEV_DIR" 2>/dev/null || true
  fi
}

cmd_status() {
  local svc pid rc=0 bin_dir
  for svc in "${SERVICES[@]}"; do
    if pid="$(running_pid "$svc")"; then
      if service_healthy "$svc"; then
        echo "$svc: running (pid $pid), healthy; $(service_where "$svc")"
      else
        echo "$svc: running (pid $pid) but NOT answering; $(service_where "$svc"); log $(log_file "$svc")"
        rc=3
      fi
    else
      echo "$svc: not running"
      rc=3
    fi
  done
  if bin_dir="$(pulumi_bin_dir)"; then
    echo "pulumi: $bin_dir"
  else
    echo "pulumi: not built yet (scripts/dev.sh install)"
  fi
  return "$rc"
}

main() {
  local cmd="${1:-help}"
  (($# > 0)) && shift
  case "$cmd" in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down "$@" ;;
    status) cmd_status ;;
    env) print_env ;;
    help | -h | --help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
