#!/usr/bin/env bash
# Brings up Redis and MariaDB (scripts/services.sh), then runs every check CI runs:
# formatting, clippy with warnings as errors, the whole test suite (the integration
# tests twice: on a single Redis node and on a Redis Cluster), and the quick fault run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

eval "$(scripts/services.sh start | sed 's/^/export /')"
export RPW_TEST_REDIS_URL="${RPW_TEST_REDIS_URL:-$RPW_REDIS__URL}"
export RPW_TEST_MYSQL_URL="${RPW_TEST_MYSQL_URL:-$RPW_MYSQL__URL}"

scripts/services.sh tools

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets -- "$@"
# The token test vectors, checked by a verifier written from API.md in another language
# (the crate's own check of the same file ran with the unit tests).
# The pages in a real browser: headless Chromium (installed when missing) drives the
# console and the wallet page against a `serve` on the same Redis and MariaDB; the
# screenshots land in .data/screenshots.
echo "== tests/browser/pages.py (headless Chromium)"
scripts/services.sh browser
/usr/bin/python3 tests/browser/pages.py --bin target/debug/redpacket-wallet --out "$ROOT/.data/screenshots"
# The Grafana dashboard and the Prometheus alert rules: promtool check and rule unit
# tests, and every metric they name exported by the service.
echo "== scripts/check-deploy.sh"
scripts/check-deploy.sh
echo "== docs/verify/verify_token.py docs/token-vectors.json"
python3 docs/verify/verify_token.py docs/token-vectors.json
# The integration suite again, every test of it, on a local Redis Cluster (3 masters,
# one replica each). Tests that need a Redis of their own (to flush, kill or restart
# it) still start a single node for themselves; the failover test brings its own
# cluster and already ran above.
echo "== cargo test --test api on a Redis Cluster (scripts/services.sh cluster)"
cluster_urls="$(scripts/services.sh cluster | sed -n 's/^RPW_REDIS__CLUSTER_URLS=//p')"
RPW_TEST_REDIS_CLUSTER_URLS="$cluster_urls" cargo test --test api -- --skip cluster:: "$@"
RPW_TEST_REDIS_CLUSTER_URLS="$cluster_urls" cargo test --test shadow -- "$@"
echo "== scripts/chaos.sh --quick"
scripts/chaos.sh --quick --json "$ROOT/.data/chaos-quick.json"
# The fault scenarios again with the service on the Redis Cluster and two MySQL shards:
# two `serve` instances and a separate `worker` sharing them, instances killed, money
# conserved to the cent (the ones that crash the harness's own Redis are left out).
echo "== scripts/chaos.sh --quick --cluster --shards 2"
scripts/chaos.sh --quick --cluster --shards 2 --json "$ROOT/.data/chaos-quick-cluster.json"
