#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing (Debian
# packages, Pulumi built from its Go modules and the project's provider
# plugins, cached), checks formatting and lints, runs the providers' Go tests,
# then every test of the workspace against the real nats-server, etcd and
# pulumi (tests start their own servers on free loopback ports).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/dev.sh install
PULUMI_BIN_DIR="$(scripts/install-pulumi.sh)"
export PATH="$PULUMI_BIN_DIR:$PATH"

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== deploy/monitoring (promtool, amtool, dashboards, collector, manifests)" >&2
bash deploy/monitoring/test.sh

echo "== cargo audit (RustSec advisories)" >&2
audit=0
scripts/audit.sh || audit=$?
if [[ $audit -ne 0 && $audit -ne 3 ]]; then
  echo "audit: vulnerable dependencies (see above)" >&2
  exit "$audit"
fi

echo "== providers (go vet, go test: real server processes on loopback)" >&2
for dir in providers/*/; do
  (cd "$dir" && go vet ./... && go test -count=1 ./...)
done

echo "== cargo test" >&2
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast -- --test-threads="${CM_TEST_THREADS:-4}" 2>&1 | tee "$LOG" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$LOG"
exit "$status"
