#!/usr/bin/env bash
# Builds the pinned nats-server from its Go module with this machine's Go
# toolchain, and caches the binary outside git.
#
# Why not Debian's package: bookworm ships nats-server 2.9.10 (January 2023),
# whose JetStream clustering loses acknowledged messages when nodes are killed
# and restarted in a row: the fault soak (worker/tests/soak.rs, three nodes,
# streams at replicas 3) found stack states written and acknowledged, never
# removed, missing from the object store minutes later. Every later 2.9 and
# 2.10 release fixed stream catch-up and replication bugs of that kind, and
# production runs a current release; the tests run the one pinned here.
#
# Output: prints the bin directory holding `nats-server`.
# Idempotent: a second run finds the cached binary and returns at once.
# `--cached`: print it only if it is built already (exit 1 otherwise).
set -euo pipefail

NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-v2.15.2}"
CACHE_ROOT="${CM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ctf-instancer}"
BIN_DIR="$CACHE_ROOT/nats-server/$NATS_SERVER_VERSION/bin"

log() { echo "install-nats: $*" >&2; }

if [[ -x "$BIN_DIR/nats-server" ]]; then
  echo "$BIN_DIR"
  exit 0
fi
[[ "${1:-}" != --cached ]] || exit 1

command -v go >/dev/null || { log "Go toolchain not found; it is needed to build nats-server"; exit 1; }
log "building nats-server $NATS_SERVER_VERSION from its Go module (first run only; under a minute)"
mkdir -p "$BIN_DIR"
STAGE="$(mktemp -d "$BIN_DIR/.build.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
GOBIN="$STAGE" go install -trimpath "github.com/nats-io/nats-server/v2@$NATS_SERVER_VERSION" >&2
"$STAGE/nats-server" --version >/dev/null || { log "the built nats-server does not run"; exit 1; }
mv "$STAGE/nats-server" "$BIN_DIR/nats-server"
echo "$BIN_DIR"
