#!/usr/bin/env bash
# Regenerates tests/golden/ after a deliberate template change. The golden tests only
# compare (they never write a golden file); with PORTOLAN_GOLDEN_OUT=DIR they also save
# what they rendered in DIR. This copies that over tests/golden/, runs the tests again
# to confirm (each output must also pass `haproxy -c`), and shows the diff to review.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# A comparison that fails is expected here: the outputs are saved before it.
PORTOLAN_GOLDEN_OUT="$out" cargo test --locked --test watcher_golden >/dev/null 2>&1 || true
if [ -z "$(ls -A "$out")" ]; then
    echo "update-golden: the golden tests saved nothing; run 'cargo test --test watcher_golden' to see why" >&2
    exit 1
fi
cp "$out"/* tests/golden/
cargo test --locked --test watcher_golden
git --no-pager diff --stat -- tests/golden/
