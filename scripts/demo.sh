#!/usr/bin/env bash
# The main job, end to end on this machine: brings the local stack up
# (installing what is missing), deploys the example scenario and prints its
# connection info.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

eval "$(scripts/dev.sh up)"
cargo build --release -q -p cm-worker
STATE=".dev/demo-identity.state.json"
target/release/cm-worker --dev scenario up examples/identity --state-file "$STATE"
echo
echo "state kept in $STATE; destroy with:"
echo "  target/release/cm-worker --dev scenario destroy examples/identity --state-file $STATE"
