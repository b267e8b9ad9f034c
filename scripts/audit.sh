#!/usr/bin/env bash
# Checks Cargo.lock against the RustSec advisory database with cargo-audit.
#
#   scripts/audit.sh                 fetch the database, then audit
#   CM_ADVISORY_DB=<dir> scripts/audit.sh   audit against a local checkout
#                                    (no network), e.g. a mirror of
#                                    github.com/rustsec/advisory-db
#
# cargo-audit is installed from crates.io into ~/.cache/ctf-instancer/tools
# (once). The database lives on GitHub; where it is unreachable, the snapshot
# of its files beside the checkout (../shared/advisory-db, dated in its
# SNAPSHOT.md) is used and its date printed. Only when neither is there does
# the audit not run: this script says so loudly ("BLOCKED") and exits 3.
# A vulnerability fails (exit 1) whichever database was read.
# Known findings and why they are accepted: README, "Dependency audit".
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${HOME}/.cache/ctf-instancer/tools"
cache_db="${HOME}/.cache/ctf-instancer/advisory-db"
db="${CM_ADVISORY_DB:-}"

if [[ -z "$db" ]]; then
  if [[ -d "$cache_db/.git" ]] && timeout 30 git -C "$cache_db" pull -q --ff-only 2>/dev/null; then
    db="$cache_db"
  elif timeout 30 git clone -q --depth 1 https://github.com/rustsec/advisory-db "$cache_db.tmp" 2>/dev/null; then
    rm -rf "$cache_db" && mv "$cache_db.tmp" "$cache_db"
    db="$cache_db"
  elif [[ -f ../shared/advisory-db/SNAPSHOT.md && -d ../shared/advisory-db/crates ]]; then
    rm -rf "$cache_db.tmp"
    db="$(cd ../shared/advisory-db && pwd -P)"
    snapshot="$(tr -s '\n' ' ' <"$db/SNAPSHOT.md" | grep -Eo 'commit [0-9a-f]+ of [0-9]{4}-[0-9]{2}-[0-9]{2}' | head -n 1 || true)"
    echo "audit: the live RustSec database is unreachable; auditing against the snapshot in $db (${snapshot:-date unknown, see its SNAPSHOT.md})" >&2
  else
    rm -rf "$cache_db.tmp"
    echo "audit: BLOCKED - the RustSec advisory database (github.com/rustsec/advisory-db) is unreachable from this machine; set CM_ADVISORY_DB to a local copy to audit" >&2
    exit 3
  fi
fi

if [[ ! -x "$tools/bin/cargo-audit" ]]; then
  echo "audit: installing cargo-audit (once, into $tools)" >&2
  cargo install -q cargo-audit --locked --root "$tools"
fi
# Unmaintained crates are reported as warnings; vulnerabilities fail.
exec "$tools/bin/cargo-audit" audit --db "$db" --no-fetch
