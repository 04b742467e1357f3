#!/usr/bin/env bash
# The long run of the property tests (tests/props.rs): every decoder and parser at the
# edge gets PROPTEST_CASES generated inputs per target (default a million), in release
# mode. Prints each target's result and the time it took.
#
#   scripts/fuzz.sh            # 1,000,000 cases per target
#   scripts/fuzz.sh 20000      # a shorter run
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CASES="${1:-1000000}"
export PROPTEST_CASES="$CASES"
# A failing case is shrunk and printed; nothing is written to the source tree.
export PROPTEST_DISABLE_FAILURE_PERSISTENCE=1
echo "== $CASES cases per target"
start=$(date +%s)
cargo test --release --test props -- --test-threads 2 --nocapture
echo "== done in $(( $(date +%s) - start )) s"
