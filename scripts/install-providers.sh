#!/usr/bin/env bash
# Builds the project's own Pulumi resource provider plugins, one Go module per
# directory under providers/ (providers/localservice ->
# pulumi-resource-localservice), into the Pulumi bin directory.
#
# Why there: the worker's driver runs pulumi with PATH = the directory of
# `pulumi` (plus Go's and the system's), and the engine takes a plugin found
# on PATH as an ambient plugin, so no `pulumi plugin install` is needed (the
# driver disables automatic plugin downloads anyway).
#
# Cached by source digest: each binary has a `<binary>.sha256` stamp beside it
# holding the SHA-256 of its module's build inputs (see source_digest; the
# test kit computes the same digest to tell a stale build). A second run with
# unchanged sources returns at once.
#
# Usage: scripts/install-providers.sh [BIN_DIR]
#   BIN_DIR defaults to the directory scripts/install-pulumi.sh prints
#   (building Pulumi first if needed). Prints BIN_DIR.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd -P)"
PROVIDERS_DIR="$REPO_ROOT/providers"

log() { echo "install-providers: $*" >&2; }

BIN_DIR="${1:-}"
if [[ -z "$BIN_DIR" ]]; then
  BIN_DIR="$("$SCRIPT_DIR/install-pulumi.sh" | tail -n 1)"
fi
[[ -d "$BIN_DIR" ]] || { log "bin directory $BIN_DIR does not exist"; exit 1; }

# SHA-256 over the lines "<sha256 of file>  ./<path>" of the module's Go
# sources (tests excluded), go.mod and go.sum, sorted by path (bytewise).
source_digest() {
  (cd "$1" && find . -type f \( \( -name '*.go' ! -name '*_test.go' \) -o -name go.mod -o -name go.sum \) -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}

shopt -s nullglob
dirs=("$PROVIDERS_DIR"/*/)
((${#dirs[@]} > 0)) || { echo "$BIN_DIR"; exit 0; }
command -v go >/dev/null || { log "Go toolchain not found; it is needed to build the provider plugins"; exit 1; }

# One build at a time into this bin directory.
exec 8>"$BIN_DIR/.install-providers.lock"
if command -v flock >/dev/null 2>&1; then
  flock -w 900 8 || { log "another install-providers.sh holds $BIN_DIR/.install-providers.lock"; exit 1; }
fi

for dir in "${dirs[@]}"; do
  dir="${dir%/}"
  [[ -f "$dir/go.mod" ]] || continue
  name="$(basename "$dir")"
  binary="pulumi-resource-$name"
  digest="$(source_digest "$dir")"
  stamp="$BIN_DIR/$binary.sha256"
  if [[ -x "$BIN_DIR/$binary" && -f "$stamp" && "$(<"$stamp")" == "$digest" ]]; then
    continue
  fi
  log "building $binary from providers/$name (sources ${digest:0:12})"
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/$binary.tmp" .)
  mv -f "$BIN_DIR/$binary.tmp" "$BIN_DIR/$binary"
  echo "$digest" >"$stamp.tmp"
  mv -f "$stamp.tmp" "$stamp"
done

echo "$BIN_DIR"
