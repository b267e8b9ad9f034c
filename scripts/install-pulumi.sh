#!/usr/bin/env bash
# Builds the pinned Pulumi CLI and its Go language host from Pulumi's Go modules
# with this machine's Go toolchain, and caches the binaries outside git.
#
# Why a throw-away module: pkg/go.mod replaces sdk/v3 with a local path, so
# `go install github.com/pulumi/pulumi/pkg/v3/cmd/pulumi@v` refuses. A module of
# our own that requires pkg/v3 and sdk/v3 at the same tag (and copies pkg's
# non-local replace lines) builds the same main package.
#
# The Go language host: since Pulumi v3.67 it lives in its own module
# (sdk/go/pulumi-language-go/v3), which the Go module proxy reachable here does
# not serve. Up to v3.66 it was a main package inside sdk/v3, which is served,
# so the host is built from there. The CLI talks to it over the stable
# LanguageRuntime gRPC protocol and falls back where newer calls are missing.
# One difference matters: since v3.67 the engine hands `runtime.options` to the
# host inside each request, while the v3.66 host only reads them as flags. So
# the host is installed as `pulumi-language-go-host`, and `pulumi-language-go`
# is a two-line wrapper passing `-binary "$CM_PULUMI_GO_BINARY"` when that
# variable is set (the worker always runs prebuilt programs, `./main`).
#
# Output: prints the bin directory holding `pulumi` and `pulumi-language-go`.
# Idempotent: a second run finds the cached binaries and returns at once.
set -euo pipefail

PULUMI_VERSION="${PULUMI_VERSION:-v3.276.0}"
PULUMI_GO_HOST_VERSION="${PULUMI_GO_HOST_VERSION:-v3.66.0}"
CACHE_ROOT="${CM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ctf-instancer}"
BIN_DIR="$CACHE_ROOT/pulumi/$PULUMI_VERSION-host$PULUMI_GO_HOST_VERSION-r2/bin"

log() { echo "install-pulumi: $*" >&2; }

if [[ -x "$BIN_DIR/pulumi" && -x "$BIN_DIR/pulumi-language-go" ]]; then
  echo "$BIN_DIR"
  exit 0
fi

command -v go >/dev/null || { log "Go toolchain not found; it is needed to build Pulumi"; exit 1; }
mkdir -p "$BIN_DIR"
WORK="$CACHE_ROOT/pulumi/build"
mkdir -p "$WORK/cli" "$WORK/host"

if [[ ! -x "$BIN_DIR/pulumi" ]]; then
  log "building pulumi $PULUMI_VERSION (first run only; several minutes on 2 cores)"
  cd "$WORK/cli"
  rm -f go.mod go.sum
  go mod init cm.local/pulumi-cli >/dev/null 2>&1
  go mod edit -require="github.com/pulumi/pulumi/pkg/v3@$PULUMI_VERSION" \
              -require="github.com/pulumi/pulumi/sdk/v3@$PULUMI_VERSION"
  go mod download "github.com/pulumi/pulumi/pkg/v3@$PULUMI_VERSION"
  PKG_DIR="$(go list -m -f '{{.Dir}}' "github.com/pulumi/pulumi/pkg/v3" 2>/dev/null || true)"
  if [[ -z "$PKG_DIR" ]]; then
    PKG_DIR="$(go env GOMODCACHE)/github.com/pulumi/pulumi/pkg/v3@$PULUMI_VERSION"
  fi
  # Copy pkg's replace lines that do not point at a local path.
  grep -E '^replace ' "$PKG_DIR/go.mod" | grep -v '=> \.' | while read -r _ from _ to ver; do
    go mod edit -replace="$from=$to@$ver"
  done
  # Pin every dependency to the versions pkg/v3 itself was tested with.
  cp "$PKG_DIR/go.sum" go.sum 2>/dev/null || true
  printf 'package main\nimport _ "github.com/pulumi/pulumi/pkg/v3/cmd/pulumi"\n' > tools.go
  sed -i 's/^package main/\/\/go:build tools\n\npackage main/' tools.go
  GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || GOFLAGS=-mod=mod go get "github.com/pulumi/pulumi/pkg/v3/cmd/pulumi@$PULUMI_VERSION"
  VERSION_PKG="github.com/pulumi/pulumi/sdk/v3/go/common/version.Version"
  GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w -X $VERSION_PKG=$PULUMI_VERSION" \
    -o "$BIN_DIR/pulumi.tmp" github.com/pulumi/pulumi/pkg/v3/cmd/pulumi
  mv "$BIN_DIR/pulumi.tmp" "$BIN_DIR/pulumi"
fi

if [[ ! -x "$BIN_DIR/pulumi-language-go-host" ]]; then
  log "building pulumi-language-go from sdk/v3@$PULUMI_GO_HOST_VERSION"
  cd "$WORK/host"
  rm -f go.mod go.sum
  go mod init cm.local/pulumi-language-go >/dev/null 2>&1
  go mod edit -require="github.com/pulumi/pulumi/sdk/v3@$PULUMI_GO_HOST_VERSION"
  printf '//go:build tools\n\npackage main\nimport _ "github.com/pulumi/pulumi/sdk/v3/go/pulumi-language-go"\n' > tools.go
  GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || true
  VERSION_PKG="github.com/pulumi/pulumi/sdk/v3/go/common/version.Version"
  GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w -X $VERSION_PKG=$PULUMI_GO_HOST_VERSION" \
    -o "$BIN_DIR/pulumi-language-go-host.tmp" github.com/pulumi/pulumi/sdk/v3/go/pulumi-language-go
  mv "$BIN_DIR/pulumi-language-go-host.tmp" "$BIN_DIR/pulumi-language-go-host"
fi

cat > "$BIN_DIR/pulumi-language-go.tmp" <<'WRAPPER'
#!/bin/sh
# Go language host; runs the prebuilt program named by CM_PULUMI_GO_BINARY when set.
host="$(dirname "$0")/pulumi-language-go-host"
if [ -n "${CM_PULUMI_GO_BINARY:-}" ]; then exec "$host" -binary "$CM_PULUMI_GO_BINARY" "$@"; fi
exec "$host" "$@"
WRAPPER
chmod +x "$BIN_DIR/pulumi-language-go.tmp"
mv "$BIN_DIR/pulumi-language-go.tmp" "$BIN_DIR/pulumi-language-go"

echo "$BIN_DIR"
