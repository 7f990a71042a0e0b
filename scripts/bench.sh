#!/usr/bin/env bash
# The benchmarks from one command, on a fresh Debian machine too.
#
#   scripts/bench.sh [ARGS]            the convergence bench: installs and starts what it
#                                      needs (etcd, HAProxy, Docker Engine, the test image)
#                                      as the tests do, then `cargo bench --bench
#                                      convergence -- ARGS` (--quick: fewer changes;
#                                      --large: adds 100,000 instances; --only=ROWS).
#                                      Writes docs/convergence.{json,svg}.
#   scripts/bench.sh --only=fleet [ARGS]
#                                      the fleet bench instead: needs etcd and HAProxy
#                                      only (no Docker: its hosts' containers are
#                                      scripted), then `cargo bench --bench fleet -- ARGS`
#                                      (--hosts N, --instances-per-host N, --quick).
#                                      Writes docs/fleet.{txt,json,svg}.
# The table goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
fleet=false
args=()
for a in "$@"; do
  if [ "$a" = "--only=fleet" ]; then
    fleet=true
  else
    args+=("$a")
  fi
done
if $fleet; then
  # shellcheck source=scripts/lib.sh
  . scripts/lib.sh
  ensure_packages "${BUILD_PACKAGES[@]}" etcd:etcd-server haproxy:haproxy
  # 1,000 registrar sessions hold ~3 etcd connections each, and each member as many.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  exec cargo bench --bench fleet -- "${args[@]}"
fi
bash scripts/test-env.sh
exec cargo bench --bench convergence -- "$@"
