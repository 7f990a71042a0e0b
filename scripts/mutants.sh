#!/usr/bin/env bash
# Mutation testing of the pure core with its unit tests only (cargo-mutants from
# crates.io): each mutant is a small change to one function (a result replaced, an
# operator flipped); a mutant the unit tests do not notice is a gap in them.
#
#   bash scripts/mutants.sh                          # every pure module below, one at a time
#   bash scripts/mutants.sh src/watcher/guard.rs     # some of them
#   bash scripts/mutants.sh --in-diff FILE [MODULE]  # only what a diff (git diff > FILE) touches
#   bash scripts/mutants.sh MODULE -- --iterate      # extra cargo-mutants flags after `--`:
#                                                    # --iterate re-tests only what was not
#                                                    # caught last time, --re REGEX some mutants
#   bash scripts/mutants.sh --summary                # the table of what the runs found so far
#
# Each module gets its own results, kept between runs (so --iterate works):
# $MUTANTS_OUT/<module>/mutants.out/{caught,missed,timeout,unviable}.txt and
# outcomes.json, with MUTANTS_OUT=mutants.out by default and <module> the path under
# src/ with / turned into - (watcher-guard, registrar-selector, ...).
#
# A mutant whose tests run past MUTANTS_TIMEOUT seconds (default 60; they take ~4 s) is
# a timeout (an endless loop, mostly). It runs under `nice -n 19` (a mutant is a build and a test run; the machine may be
# shared) and skips the one slow unit test that no pure module reaches (it waits 10 s
# of wall clock for a metrics client to go idle) — skipping tests can only miss more
# mutants, never catch more, so the score stays honest. About 20-30 s a mutant on a
# loaded 2-core VM; docs/mutants.txt has the latest results.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants
pure=(
  src/watcher/guard.rs src/watcher/haproxy/runtime_plan.rs src/registrar/plan.rs
  src/watcher/store.rs src/watcher/linger.rs src/watcher/report.rs src/watcher/render.rs
  src/watcher/policy.rs src/watcher/confine.rs src/watcher/apply/route.rs
  src/registrar/selector src/schema.rs src/config
)
if [ "${1:-}" = --summary ]; then
  # One row per module run so far: the numbers docs/mutants.txt tabulates. Viable is
  # caught + missed + timeout; "not run" is what --list finds that no run got to.
  out_root=${MUTANTS_OUT:-mutants.out}
  printf '%-40s %7s %6s %6s %7s %8s %7s %8s\n' module mutants caught missed timeout \
    unviable "not run" "% caught"
  for f in "${pure[@]}"; do
    name=${f#src/}; name=${name%.rs}; name=${name//\//-}
    d=$out_root/$name/mutants.out
    [ -d "$d" ] || continue
    glob=$f; [ -d "$f" ] && glob="$f/**"
    total=$(cargo mutants --list --file "$glob" | wc -l)
    n() { sort -u "$d/$1.txt" 2>/dev/null | grep -c . || true; }
    # After --iterate, caught.txt has only this run's; previously_caught.txt has the
    # earlier caught and unviable ones (unviable.txt keeps all unviable, see below).
    c=$(cat "$d/caught.txt" "$d/previously_caught.txt" 2>/dev/null | sort -u |
      comm -23 - <(sort -u "$d/unviable.txt" 2>/dev/null) | grep -c . || true)
    m=$(n missed) t=$(n timeout) u=$(n unviable)
    viable=$((c + m + t))
    pct=$([ "$viable" -gt 0 ] && echo "$((100 * c / viable)) %" || echo -)
    printf '%-40s %7s %6s %6s %7s %8s %7s %8s\n' "$f" "$total" "$c" "$m" "$t" "$u" \
      "$((total - c - m - t - u))" "$pct"
  done
  exit 0
fi
diff=()
if [ "${1:-}" = --in-diff ]; then
  [ -f "${2:-}" ] || { echo "mutants.sh: --in-diff needs a diff file (git diff > FILE)" >&2; exit 2; }
  diff=(--in-diff "$(realpath "$2")")
  shift 2
fi
files=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do files+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
extra=("$@")
[ ${#files[@]} -gt 0 ] || files=("${pure[@]}")
out_root=${MUTANTS_OUT:-mutants.out}
status=0
for f in "${files[@]}"; do
  [ -e "$f" ] || { echo "mutants.sh: no module $f (a path under src/, as listed in this script)" >&2; exit 2; }
  name=${f#src/}
  name=${name%.rs}
  name=${name%/}
  name=${name//\//-}
  glob=$f
  [ -d "$f" ] && glob="${f%/}/**"
  mkdir -p "$out_root/$name"
  echo "== $f -> $out_root/$name/mutants.out"
  # Unit tests only: the integration tests need etcd, HAProxy and Docker, and take minutes.
  # `--cargo-arg --lib` builds only the lib's test binary too (with `-- --lib` alone the
  # build step links all ~70 test and bench binaries for every mutant).
  # Exit 2 (some mutants missed) or 3 (timeouts) must not stop the other modules.
  # --iterate moves the last results to mutants.out.old and leaves the unviable ones out
  # of the new unviable.txt: put them back, so the counts stay whole across iterations.
  prev_unviable=$(cat "$out_root/$name/mutants.out/unviable.txt" 2>/dev/null || true)
  nice -n 19 cargo mutants --no-shuffle --timeout "${MUTANTS_TIMEOUT:-60}" --file "$glob" "${diff[@]}" \
    --output "$out_root/$name" "${extra[@]}" \
    --cargo-arg --lib -- -- --skip idle_clients_are_dropped_and_do_not_block_scrapes || status=$?
  if [[ " ${extra[*]} " == *" --iterate "* ]] && [ -n "$prev_unviable" ]; then
    u=$out_root/$name/mutants.out/unviable.txt
    { cat "$u" 2>/dev/null; echo "$prev_unviable"; } | sort -u | grep . > "$u.new" && mv "$u.new" "$u"
  fi
done
exit "$status"
