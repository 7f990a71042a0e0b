#!/usr/bin/env bash
# Mutation testing of the pure core with its unit tests only (cargo-mutants from
# crates.io): each mutant is a small change to one function (a result replaced, an
# operator flipped); a mutant the unit tests do not notice is a gap in them.
#
#   bash scripts/mutants.sh                  # every pure module below
#   bash scripts/mutants.sh src/watcher/guard.rs   # some of them
#   bash scripts/mutants.sh --in-diff FILE   # only what a diff (git diff > FILE) touches
#
# Results: mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants
pure=(
  src/watcher/store.rs src/watcher/guard.rs src/watcher/linger.rs src/watcher/policy.rs
  src/watcher/render.rs src/watcher/confine.rs src/watcher/report.rs
  src/watcher/apply/route.rs src/watcher/haproxy/runtime_plan.rs
  src/registrar/plan.rs src/registrar/selector src/schema.rs src/config
)
args=()
if [ "${1:-}" = --in-diff ]; then
  args=(--in-diff "$2")
  shift 2
fi
files=("$@")
[ ${#files[@]} -gt 0 ] || files=("${pure[@]}")
for f in "${files[@]}"; do args+=(--file "$f"); done
# Unit tests only: the integration tests need etcd, HAProxy and Docker, and take minutes.
exec cargo mutants --no-shuffle --timeout 120 "${args[@]}" -- --lib
