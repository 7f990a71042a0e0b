#!/usr/bin/env bash
# The whole test suite, as CI runs it: prepare the machine, check formatting and lints,
# run every unit and integration test against a real etcd, HAProxy and Docker Engine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-env.sh
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-targets --locked --no-fail-fast
else
  cargo test --all-targets --locked --no-fail-fast
fi
