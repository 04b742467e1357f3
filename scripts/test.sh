#!/usr/bin/env bash
# Brings up Redis and MariaDB (scripts/services.sh), then runs every check CI runs:
# formatting, clippy with warnings as errors, and the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

eval "$(scripts/services.sh start | sed 's/^/export /')"
export RPW_TEST_REDIS_URL="${RPW_TEST_REDIS_URL:-$RPW_REDIS__URL}"
export RPW_TEST_MYSQL_URL="${RPW_TEST_MYSQL_URL:-$RPW_MYSQL__URL}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets -- "$@"
echo "== scripts/chaos.sh --quick"
scripts/chaos.sh --quick --json "$ROOT/.data/chaos-quick.json"
