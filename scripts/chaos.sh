#!/usr/bin/env bash
# The fault harness: seeded crash, loss and outage schedules under bursty load, with a
# report to the cent (bench/src/bin/rpw-chaos.rs).
#
#   scripts/chaos.sh --quick                 # every scenario once, short load (in scripts/test.sh)
#   scripts/chaos.sh --seed 7 --scenario redis-loss
#   scripts/chaos.sh --seeds 20 --json chaos.json
#   scripts/chaos.sh --quick --cluster       # the service on a local Redis Cluster
#
# It builds in release mode and runs its own Redis (AOF everysec) and MariaDB on ports
# 6390 and 3310 (RPW_CHAOS_REDIS_PORT, RPW_CHAOS_MYSQL_PORT) with data under
# .data/chaos, so it can kill them without touching anything else; it stops them at the
# end. Logs of the service processes: .data/chaos/logs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
# --cluster: the service runs on the local Redis Cluster (scripts/services.sh cluster);
# the scenarios that kill or flush the harness's own Redis are left out.
ARGS=()
for a in "$@"; do
  if [[ $a == --cluster ]]; then
    ARGS+=(--cluster "$(scripts/services.sh cluster | sed -n 's/^RPW_REDIS__CLUSTER_URLS=//p')")
  else
    ARGS+=("$a")
  fi
done
set -- ${ARGS[@]+"${ARGS[@]}"}
cargo build --release --quiet -p redpacket-wallet --bin redpacket-wallet
cargo build --release --quiet -p rpw-bench --bin rpw-chaos
exec "$TARGET/release/rpw-chaos" --bin "$TARGET/release/redpacket-wallet" \
  --redis-port "${RPW_CHAOS_REDIS_PORT:-6390}" --mysql-port "${RPW_CHAOS_MYSQL_PORT:-3310}" "$@"
