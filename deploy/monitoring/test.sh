#!/usr/bin/env bash
# Static validation of the reference deployment and monitoring stack (deploy/):
# no Docker, no running Prometheus; only the tools' own checkers and unit tests.
#
#   bash deploy/monitoring/test.sh
#
# Installs what is missing first (Debian, as root): promtool (package
# prometheus), amtool (prometheus-alertmanager), PyYAML (python3-yaml, else
# pip). Debian starts the services of the packages it installs when it can:
# they are stopped again (only where systemd runs); nothing here uses them.
#
# Checks, each counted once:
#   promtool check config / check rules / test rules (unit tests of every alert)
#   amtool check-config, and the route each severity takes
#   check_stack.py: YAML parses; alert metadata, thresholds, runbook anchors,
#   two-way tests; Grafana dashboard and datasources; collector and Jaeger
#   configs; compose file vs Dockerfile/Prometheus/Grafana; k8s manifests and
#   KEDA; Dockerfile; and, per alert, that its unit tests fail when the alert
#   is broken both ways (never fires / always fires).
# Ends with one line: `monitoring: N passed, M failed`; exit status 1 if M > 0.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
cd "$HERE"

log() { echo "test.sh: $*" >&2; }

# ------------------------------------------------------------------ tools
apt_install() {
  if [[ $(id -u) -ne 0 ]]; then
    log "need root to apt-get install $*"
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "$@" >/dev/null; }
}

packages=()
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
command -v amtool >/dev/null 2>&1 || packages+=(prometheus-alertmanager)
if ((${#packages[@]})); then
  log "installing ${packages[*]} (for promtool/amtool)"
  apt_install "${packages[@]}"
  # The packages' services are of no use here; with systemd they may have been
  # started (elsewhere policy-rc.d or the lack of an init system prevents it).
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    systemctl stop prometheus.service prometheus-alertmanager.service >/dev/null 2>&1 || true
  fi
fi

PY=""
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import yaml' >/dev/null 2>&1; then
    PY="$candidate"
    break
  fi
done
if [[ -z "$PY" ]]; then
  log "installing PyYAML"
  if apt_install python3-yaml && /usr/bin/python3 -c 'import yaml' >/dev/null 2>&1; then
    PY=/usr/bin/python3
  else
    python3 -m pip install --quiet pyyaml
    PY=python3
  fi
fi

# ------------------------------------------------------------------ runner
passed=0
failed=0
failures=()

check() {
  local name="$1"
  shift
  local out
  out="$(mktemp)"
  if "$@" >"$out" 2>&1; then
    passed=$((passed + 1))
    printf 'ok    %-42s %s\n' "$name" "$(grep -v '^\s*$' "$out" | tail -n 1)"
  else
    failed=$((failed + 1))
    failures+=("$name")
    printf 'FAIL  %s\n' "$name"
    sed 's/^/      /' "$out"
  fi
  rm -f "$out"
}

# `amtool config routes test` prints the receiver a label set is routed to.
route_is() {
  local want="$1"
  shift
  local got
  got="$(amtool config routes test --config.file=alertmanager.yml "$@" 2>/dev/null)"
  echo "$* -> $got"
  [[ "$got" == "$want" ]]
}

# ------------------------------------------------------------------ checks
echo "promtool: $(promtool --version 2>&1 | head -n 1)"
echo "amtool:   $(amtool --version 2>&1 | head -n 1)"

check "promtool check config prometheus.yml" promtool check config prometheus.yml
check "promtool check rules rules/*.yml" promtool check rules rules/*.yml
echo "rule tests: $("$PY" check_stack.py count-tests)"
check "promtool test rules rules/tests/*.yml" promtool test rules rules/tests/*.yml
check "amtool check-config alertmanager.yml" amtool check-config alertmanager.yml
check "route: critical -> cm-pager" route_is cm-pager severity=critical alertname=CmNoWorkerConsuming
check "route: warning -> cm-tickets" route_is cm-tickets severity=warning alertname=CmDeadLetters
check "route: no severity -> cm-default" route_is cm-default alertname=SomethingElse

check "yaml: every file under deploy/ parses" "$PY" check_stack.py yaml
check "rules: metadata, thresholds, runbooks" "$PY" check_stack.py rules
check "grafana: datasources" "$PY" check_stack.py datasources
check "grafana: dashboards" "$PY" check_stack.py dashboard
check "collector: otel-collector.yaml pipelines" "$PY" check_stack.py collector otel-collector.yaml
check "collector: otel-collector.yaml wiring" "$PY" check_stack.py otel
check "collector: jaeger/config.yaml pipelines" "$PY" check_stack.py collector jaeger/config.yaml
check "jaeger: SPM from Prometheus" "$PY" check_stack.py jaeger
check "compose: deploy/docker-compose.yml" "$PY" check_stack.py compose
check "dockerfile: deploy/Dockerfile" "$PY" check_stack.py dockerfile
check "k8s: deploy/k8s manifests + KEDA" "$PY" check_stack.py k8s

mapfile -t alerts < <("$PY" check_stack.py alerts)
for alert in "${alerts[@]}"; do
  check "mutants: $alert" "$PY" check_stack.py mutate "$alert"
done

if ((failed)); then
  log "failed: ${failures[*]}"
fi
echo "monitoring: $passed passed, $failed failed"
((failed == 0))
