#!/usr/bin/env bash
# The convergence benchmark from one command, on a fresh Debian machine too: installs
# and starts what it needs (etcd, HAProxy, Docker Engine, the test image) as the tests
# do, then runs `cargo bench --bench convergence` with the arguments given
# (--quick: fewer changes; --large: adds 100,000 instances; --only=ROWS).
# Writes docs/convergence.{json,svg}; the table goes to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-env.sh
exec cargo bench --bench convergence -- "$@"
