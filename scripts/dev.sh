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
                the Debian packages etcd-server (/usr/bin/etcd) and
                protobuf-compiler (protoc), prometheus and prometheus-alertmanager
                (used by the monitoring tests), netcat-openbsd (nc, to talk to
                the demo's TCP service), docker-registry (the OCI registry the
                scenario-source tests push to; its systemd service is not
                used) with apt-get (apt-get update first only
                when something is missing), then nats-server (the pinned
                release, built from its Go module via scripts/install-nats.sh,
                cached: Debian's 2.9 loses acknowledged JetStream messages when
                cluster nodes restart), then the Pulumi CLI and its Go
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

# The nats-server to run: the pinned build scripts/install-nats.sh caches
# (Debian's 2.9 loses acknowledged JetStream messages under node restarts,
# see that script), else one on the PATH.
find_nats() {
  local dir
  if dir="$("$SCRIPT_DIR/install-nats.sh" --cached 2>/dev/null)"; then
    echo "$dir/nats-server"
  else
    find_bin nats-server
  fi
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

# ------------------------------------------------------------------ parts --
#
# Every part the project needs, each checked by what it must provide (a
# server that starts, a protoc that compiles a file importing the well-known
# types, plugins that answer), not by a binary's presence alone.
# Columns: name | Debian packages that provide it ("" = not from apt) | what
# the check proves | how to install it.

PARTS=(
  "protoc|protobuf-compiler libprotobuf-dev|compiles a .proto importing the well-known types (google/protobuf/*.proto)|apt-get install protobuf-compiler libprotobuf-dev"
  "nats-server||the pinned release starts with JetStream on a free loopback port|scripts/install-nats.sh (built from its Go module, cached)"
  "etcd|etcd-server|starts on free loopback ports and answers /health|apt-get install etcd-server"
  "promtool|prometheus|answers --version (alert rule tests)|apt-get install prometheus"
  "amtool|prometheus-alertmanager|answers --version (Alertmanager config tests)|apt-get install prometheus-alertmanager"
  "docker-registry|docker-registry|answers --version (OCI registry for scenario-source tests)|apt-get install docker-registry"
  "nc|netcat-openbsd|present (talks to the demo's TCP service)|apt-get install netcat-openbsd"
  "script|bsdutils|present (pseudo-terminal for CLI tests)|apt-get install bsdutils"
  "pgrep|procps|present, with kill (the fault tests find and kill pulumi runs)|apt-get install procps"
  "curl|curl|answers --version (health checks)|apt-get install curl"
  "go||answers 'go version' (builds Pulumi, providers and scenarios)|the machine's Go toolchain (https://go.dev/doc/install)"
  "cargo||answers --version|the machine's Rust toolchain (rustup)"
  "pulumi||the pinned CLI answers 'pulumi version'|scripts/install-pulumi.sh (built from Go modules, cached)"
  "pulumi-language-go||the Go language host starts and prints its gRPC port|scripts/install-pulumi.sh"
  "pulumi-resource-localservice||the provider plugin starts and prints its gRPC port|scripts/install-providers.sh"
)

# Scratch space of the checks, made once in the main shell (the checks run
# in subshells) and removed on exit.
CHECK_TMP=""
init_check_tmp() {
  [[ -n "$CHECK_TMP" ]] && return 0
  CHECK_TMP="$(mktemp -d "${TMPDIR:-/tmp}/cm-check.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$CHECK_TMP'" EXIT
}
check_tmp() { echo "$CHECK_TMP"; }

# A free TCP port on loopback (asks the kernel).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Runs "$@" in the background (stdout to probe.out, stderr to probe.log in
# the scratch directory), waits up to $1 seconds for $2 (a command) to
# succeed, then kills it. Usage: start_and_probe SECONDS PROBE -- CMD...
start_and_probe() {
  local secs="$1" probe="$2" pid ok=1 i
  shift 3
  : >"$(check_tmp)/probe.out"
  "$@" >"$(check_tmp)/probe.out" 2>"$(check_tmp)/probe.log" &
  pid=$!
  for ((i = 0; i < secs * 10; i++)); do
    if eval "$probe"; then ok=0; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  return "$ok"
}

# A Pulumi plugin (provider or language host) serves gRPC and prints its
# port first thing: start it, wait for that line (10 s at most), stop it.
plugin_port() {
  local log port
  log="$(check_tmp)/probe.out"
  if ! start_and_probe 10 "grep -Eq '^[0-9]+\$' '$log'" -- "$@"; then
    echo "did not print its gRPC port (got '$(head -c 60 "$log")')"
    return 1
  fi
  port="$(head -n 1 "$log")"
  echo "serves gRPC (answered on port $port)"
}

# Prints a one-line detail on success; fails with a reason on stdout.
check_part() {
  local name="$1" bin tmp port port2 out
  case "$name" in
    protoc)
      bin="$(find_bin protoc)" || { echo "protoc not found"; return 1; }
      tmp="$(check_tmp)/wkt"
      mkdir -p "$tmp"
      cat >"$tmp/check.proto" <<'PROTO'
syntax = "proto3";
package cmcheck;
import "google/protobuf/any.proto";
import "google/protobuf/descriptor.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/empty.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";
message Check {
  google.protobuf.Any any = 1;
  google.protobuf.Duration duration = 2;
  google.protobuf.Empty empty = 3;
  google.protobuf.FieldMask mask = 4;
  google.protobuf.Struct fields = 5;
  google.protobuf.Timestamp at = 6;
  google.protobuf.StringValue text = 7;
  google.protobuf.FileDescriptorProto file = 8;
}
PROTO
      if ! out="$("$bin" -I "$tmp" -o "$tmp/check.pb" "$tmp/check.proto" 2>&1)"; then
        echo "$(head -n 1 <<<"$out") (the well-known types come with libprotobuf-dev)"
        return 1
      fi
      "$bin" --version
      ;;
    nats-server)
      bin="$("$SCRIPT_DIR/install-nats.sh" --cached 2>/dev/null)/nats-server" ||
        { echo "the pinned nats-server is not built (scripts/install-nats.sh)"; return 1; }
      port="$(free_port)"
      port2="$(free_port)"
      tmp="$(check_tmp)/nats"
      if ! start_and_probe 15 "curl -fsS --max-time 1 'http://127.0.0.1:$port2/healthz?js-enabled-only=true' >/dev/null 2>&1" -- \
        "$bin" -js -a 127.0.0.1 -p "$port" -m "$port2" -sd "$tmp"; then
        echo "did not start with JetStream: $(tail -n 1 "$(check_tmp)/probe.log")"
        return 1
      fi
      "$bin" --version
      ;;
    etcd)
      bin="$(find_bin etcd)" || { echo "etcd not found"; return 1; }
      port="$(free_port)"
      port2="$(free_port)"
      tmp="$(check_tmp)/etcd"
      case "$(uname -m)" in aarch64 | arm64) export ETCD_UNSUPPORTED_ARCH=arm64 ;; esac
      if ! start_and_probe 20 "curl -fsS --max-time 1 http://127.0.0.1:$port/health 2>/dev/null | grep -Eq '\"health\":[[:space:]]*\"?true'" -- \
        "$bin" --name check --data-dir "$tmp" --listen-client-urls "http://127.0.0.1:$port" \
        --advertise-client-urls "http://127.0.0.1:$port" --listen-peer-urls "http://127.0.0.1:$port2" \
        --initial-advertise-peer-urls "http://127.0.0.1:$port2" --initial-cluster "check=http://127.0.0.1:$port2" \
        --logger zap --log-outputs stderr; then
        echo "did not start: $(tail -n 1 "$(check_tmp)/probe.log" | cut -c1-160)"
        return 1
      fi
      out="$("$bin" --version)" || { echo "'etcd --version' failed"; return 1; }
      head -n 1 <<<"$out"
      ;;
    promtool | amtool | docker-registry | curl)
      bin="$(find_bin "$name")" || { echo "$name not found"; return 1; }
      out="$("$bin" --version 2>&1)" || { echo "'$name --version' failed: $(head -n 1 <<<"$out")"; return 1; }
      head -n 1 <<<"$out"
      ;;
    nc | script)
      find_bin "$name" || { echo "$name not found"; return 1; }
      ;;
    pgrep)
      find_bin kill >/dev/null || { echo "kill not found"; return 1; }
      find_bin "$name" || { echo "$name not found"; return 1; }
      ;;
    go)
      command -v go >/dev/null 2>&1 || { echo "go not found"; return 1; }
      go version
      ;;
    cargo)
      command -v cargo >/dev/null 2>&1 || { echo "cargo not found"; return 1; }
      cargo --version
      ;;
    pulumi | pulumi-language-go | pulumi-resource-localservice)
      local dir
      dir="$(pulumi_bin_dir)" || { echo "not built yet"; return 1; }
      [[ -x "$dir/$name" ]] || { echo "$dir/$name missing"; return 1; }
      case "$name" in
        pulumi)
          out="$("$dir/pulumi" version 2>&1)" || { echo "'pulumi version' failed: $(head -n 1 <<<"$out")"; return 1; }
          echo "$out ($dir)"
          ;;
        pulumi-language-go)
          # Given an engine address, the host serves gRPC and prints its port
          # (through the wrapper, as the engine starts it).
          plugin_port "$dir/$name" 127.0.0.1:1
          ;;
        pulumi-resource-localservice)
          # A provider plugin serves gRPC and prints its port first thing.
          plugin_port "$dir/$name"
          ;;
      esac
      ;;
    *) echo "unknown part"; return 1 ;;
  esac
}

# Prints the table of parts; fails when one is missing or broken.
# With an argument "quiet", prints nothing when all are fine.
check_parts() {
  local quiet="${1:-}" entry name pkgs proves how detail rc=0 lines=()
  init_check_tmp
  for entry in "${PARTS[@]}"; do
    IFS='|' read -r name pkgs proves how <<<"$entry"
    if detail="$(check_part "$name" 2>&1)"; then
      lines+=("$(printf '  ok       %-30s %s' "$name" "$(head -n 1 <<<"$detail" | cut -c1-90)")")
    else
      rc=1
      lines+=("$(printf '  MISSING  %-30s %s\n           %-30s needs: %s\n           %-30s install: %s' \
        "$name" "$(tail -n 1 <<<"$detail" | cut -c1-110)" "" "$proves" "" "$how")")
    fi
  done
  if [[ "$quiet" != quiet || $rc -ne 0 ]]; then
    echo "parts this project needs (scripts/dev.sh install installs them all):" >&2
    printf '%s\n' "${lines[@]}" >&2
  fi
  return "$rc"
}

# The Debian packages of the parts whose check fails.
missing_packages() {
  local entry name pkgs proves how
  init_check_tmp
  for entry in "${PARTS[@]}"; do
    IFS='|' read -r name pkgs proves how <<<"$entry"
    [[ -n "$pkgs" ]] || continue
    check_part "$name" >/dev/null 2>&1 || echo "$pkgs"
  done
}

install_packages() {
  local missing
  init_check_tmp
  # shellcheck disable=SC2207
  missing=($(missing_packages | tr ' ' '\n' | sort -u))
  ((${#missing[@]} == 0)) && return 0
  command -v apt-get >/dev/null 2>&1 ||
    die "missing ${missing[*]} and no apt-get here; install them by hand"
  log "installing Debian packages: ${missing[*]} (about a minute)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
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
  if [[ "${1:-}" == --check ]]; then
    check_parts
    return
  fi
  [[ -z "${1:-}" ]] || die "install: unknown argument '$1' (only --check)"
  install_packages
  "$SCRIPT_DIR/install-nats.sh" >/dev/null || die "scripts/install-nats.sh failed"
  install_pulumi
  if ((${CM_DEV_SKIP_PULUMI:-0} == 1)); then
    PARTS=("${PARTS[@]:0:${#PARTS[@]}-3}")
  fi
  check_parts quiet || die "some parts are missing or broken after installing (table above)"
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
      CMD=("$(find_nats || echo nats-server)" -js -a "$HOST"
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
        --initial-cluster-token ctf-instancer-dev --logger zap --log-outputs stderr
        --auto-compaction-mode periodic --auto-compaction-retention 1h
        --quota-backend-bytes 2147483648)
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
    install) cmd_install "$@" ;;
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
