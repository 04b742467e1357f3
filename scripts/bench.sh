#!/usr/bin/env bash
# Benchmark: builds in release mode, brings up Redis and MariaDB, starts the service
# (worker off, so awards become a backlog), runs the scenarios with rpw-bench, stops what
# it started and prints a table.
#
#   scripts/bench.sh [--quick] [--cluster] [--h2c] [--server-threads N] [--json FILE] [--plot FILE.png|FILE.svg]
#   scripts/bench.sh --shadow URL [--quick] [--json FILE]
#
# --shadow URL loads an instance already running at URL with shadow traffic
# (X-RPW-Shadow: 1): nothing is started, the instance's settings (RPW_* variables:
# Redis, MySQL, admin and caller keys, JWT secret) must be in the environment, and
# RPW_BENCH_BASELINE_MYSQL_URL must name a scratch database for the synchronous
# baseline. Its real balances, budgets, reports and metrics are not touched; its shadow
# data expires (shadow.expire_after_secs).
#
# --h2c sends every request as an HTTP/2 stream without TLS (prior knowledge); the
# server answers HTTP/1.1 and h2c on the same port.
#
# --server-threads N starts the server with N tokio worker threads (TOKIO_WORKER_THREADS)
# instead of one per core; the summary says so. On this 2-core machine the server shares
# the cores with Redis, MariaDB and the bench's clients (README, "Worker threads").
#
# --cluster runs it on the local Redis Cluster of `scripts/services.sh cluster`
# (3 masters, one replica each) instead of the single node, with the budget's sub-stocks
# placed in the partitions (`issue.sub_stocks_in_partitions`) unless
# RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS=false says otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BENCH_ARGS=()
PLOT=""
CLUSTER=0
SHADOW_URL=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) BENCH_ARGS+=(--quick); shift ;;
    --json) BENCH_ARGS+=(--json "$(realpath -m "$2")"); shift 2 ;;
    --plot) PLOT="$(realpath -m "$2")"; BENCH_ARGS+=(--plot "$PLOT"); shift 2 ;;
    --drain-tps) BENCH_ARGS+=(--drain-tps "$2"); shift 2 ;;
    --keep) BENCH_ARGS+=(--keep); shift ;;
    --h2c) BENCH_ARGS+=(--h2c); shift ;;
    --cluster) CLUSTER=1; shift ;;
    --server-threads)
      [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "--server-threads takes a positive number" >&2; exit 2; }
      export RPW_BENCH_SERVER_THREADS="$2"; shift 2 ;;
    --shadow) SHADOW_URL="$2"; shift 2 ;;
    *) echo "usage: $0 [--quick] [--cluster | --shadow URL] [--h2c] [--server-threads N] [--json FILE] [--plot FILE] [--drain-tps N] [--keep]" >&2; exit 2 ;;
  esac
done

if [[ -n $SHADOW_URL ]]; then
  : "${RPW_AUTH__ADMIN_KEY:?--shadow needs the settings of the instance (RPW_*) in the environment}"
  : "${RPW_BENCH_BASELINE_MYSQL_URL:?--shadow: RPW_BENCH_BASELINE_MYSQL_URL must name a scratch database}"
  echo "[bench] building (release)" >&2
  cargo build --release --workspace --bins -q
  TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
  RPW_MYSQL__URL="$RPW_BENCH_BASELINE_MYSQL_URL" "$TARGET_DIR/release/redpacket-wallet" migrate >/dev/null
  echo "[bench] shadow traffic to $SHADOW_URL" >&2
  RPW_BENCH_URL="$SHADOW_URL" exec "$TARGET_DIR/release/rpw-bench" --shadow "${BENCH_ARGS[@]}"
fi

eval "$(scripts/services.sh start | sed 's/^/export /')"
REDIS_PORTS=("${RPW_REDIS__URL##*:}")
if [[ $CLUSTER -eq 1 ]]; then
  eval "$(scripts/services.sh cluster | sed 's/^/export /')"
  # A deployment started on a cluster places its sub-stocks in the partitions, so one
  # store call takes an award's money and stores its token (set it to false to measure
  # the steps).
  export RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS="${RPW_ISSUE__SUB_STOCKS_IN_PARTITIONS:-true}"
  REDIS_PORTS=()
  for url in ${RPW_REDIS__CLUSTER_URLS//,/ }; do REDIS_PORTS+=("${url##*:}"); done
fi
# Redis command time (µs) and calls summed over the masters, from INFO commandstats.
redis_usage() {
  local port
  for port in "${REDIS_PORTS[@]}"; do
    redis-cli -p "$port" INFO replication | grep -q '^role:master' || continue
    redis-cli -p "$port" INFO commandstats
  done | tr -d '\r' | awk -F'[=,:]' '/^cmdstat_/ {calls += $3; usec += $5} END {printf "%d %d\n", calls, usec}'
}
if [[ -n $PLOT && ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]]; then
  echo "[bench] installing fonts-dejavu-core for the plot" >&2
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q fonts-dejavu-core >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q fonts-dejavu-core >/dev/null; }
fi

echo "[bench] building (release)" >&2
cargo build --release --workspace --bins -q
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/release/redpacket-wallet"
BENCH="$TARGET_DIR/release/rpw-bench"

RUN="$(date +%Y%m%d%H%M%S)$$"
WORK="$ROOT/.data/bench-$RUN"
mkdir -p "$WORK"
MYSQL_BASE="${RPW_MYSQL__URL%/*}"
PORT="${RPW_BENCH_PORT:-18090}"
rand() { head -c 18 /dev/urandom | base64 | tr -d '/+=' ; }
export RPW_MYSQL__URL="$MYSQL_BASE/rpw_bench_$RUN"
export RPW_BENCH_BASELINE_MYSQL_URL="$MYSQL_BASE/rpw_bench_base_$RUN"
export RPW_MYSQL__MAX_CONNECTIONS=64
export RPW_REDIS__KEY_PREFIX="bench$RUN"
export RPW_KEYS__DIR="$WORK/keys"
export RPW_AUTH__ADMIN_KEY="admin-$(rand)"
export RPW_AUTH__CALLER_KEYS="bench:caller-$(rand)"
export RPW_AUTH__JWT_SECRET="jwt-$(rand)"
export RPW_HTTP__ADDR="127.0.0.1:$PORT"
export RPW_SETTLE__ENABLED=false
export RPW_SHADOW__ENABLED=false
export RPW_BENCH_URL="http://127.0.0.1:$PORT"
export RUST_LOG="${RUST_LOG:-warn}"

"$BIN" migrate >/dev/null
RPW_MYSQL__URL="$RPW_BENCH_BASELINE_MYSQL_URL" "$BIN" migrate >/dev/null
"$BIN" keys generate >/dev/null

# An AOF rewrite forks a child that compresses the whole dataset for seconds. On a
# machine whose cores the service, Redis, MariaDB and the bench all share, a rewrite that
# lands inside a scenario takes a core from it (each quick run writes about 1 GB of AOF,
# enough to start one at a random moment). So the AOF is rewritten before the run, while
# nothing is measured, and automatic rewrites wait until the run ends; the setting each
# node had is put back afterwards. Every node of a cluster, replicas too: theirs share
# the cores as well.
REDIS_NODES=("${REDIS_PORTS[@]}")
if [[ $CLUSTER -eq 1 ]]; then
  mapfile -t REDIS_NODES < <(redis-cli -p "${REDIS_PORTS[0]}" CLUSTER NODES | awk '{split($2, a, "[:@]"); print a[2]}')
fi
AOF_MIN_SIZES=()
restore_aof() {
  local i
  for i in "${!AOF_MIN_SIZES[@]}"; do
    redis-cli -p "${REDIS_NODES[$i]}" CONFIG SET auto-aof-rewrite-min-size "${AOF_MIN_SIZES[$i]}" >/dev/null || true
  done
}
trap restore_aof EXIT
for port in "${REDIS_NODES[@]}"; do
  AOF_MIN_SIZES+=("$(redis-cli -p "$port" CONFIG GET auto-aof-rewrite-min-size | tail -1)")
  redis-cli -p "$port" CONFIG SET auto-aof-rewrite-min-size 1099511627776 >/dev/null
  redis-cli -p "$port" BGREWRITEAOF >/dev/null 2>&1 || true
done
for port in "${REDIS_NODES[@]}"; do
  for _ in $(seq 1 600); do
    [[ $(redis-cli -p "$port" INFO persistence | tr -d '\r' | grep -c '^aof_rewrite_\(in_progress\|scheduled\):0') -eq 2 ]] && break
    sleep 0.1
  done
done

env ${RPW_BENCH_SERVER_THREADS:+TOKIO_WORKER_THREADS="$RPW_BENCH_SERVER_THREADS"} \
  "$BIN" serve --no-cron >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
cleanup() {
  restore_aof
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK/keys"
}
trap cleanup EXIT

ready() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$PORT" || exit 1
    printf 'GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    head -1 <&3 | grep -q ' 200 '
  ) 2>/dev/null
}
for _ in $(seq 1 100); do ready && break; sleep 0.2; done
ready || { echo "[bench] the server did not become ready; see $WORK/server.log" >&2; tail -20 "$WORK/server.log" >&2; exit 1; }

read -r CALLS_BEFORE USEC_BEFORE <<<"$(redis_usage)"
# The processes whose CPU the bench attributes to each scenario.
redis_pids=()
for port in "${REDIS_PORTS[@]}"; do
  pid="$(redis-cli -p "$port" INFO server | tr -d '\r' | sed -n 's/^process_id://p')"
  [[ -n $pid ]] && redis_pids+=("$pid")
done
mysql_url="${RPW_MYSQL__URL#mysql://}"
mysql_port="${mysql_url#*@*:}"; mysql_port="${mysql_port%%/*}"
mysql_pidfile="$(mariadb --protocol=TCP -h127.0.0.1 -P"$mysql_port" -urpw -prpw -N -e 'SELECT @@pid_file' 2>/dev/null || true)"
mysql_pid="$(cat "$mysql_pidfile" 2>/dev/null || true)"
export RPW_BENCH_PIDS="server=$SERVER_PID,redis=$(IFS=+; echo "${redis_pids[*]}")${mysql_pid:+,mysql=$mysql_pid}"
echo "[bench] measuring CPU of: $RPW_BENCH_PIDS" >&2
echo "[bench] machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m); server pid $SERVER_PID" >&2
"$BENCH" "${BENCH_ARGS[@]}"
read -r CALLS_AFTER USEC_AFTER <<<"$(redis_usage)"
echo "[bench] redis (${#REDIS_PORTS[@]} node(s)): $((CALLS_AFTER - CALLS_BEFORE)) commands, $((USEC_AFTER - USEC_BEFORE)) µs of command time over the whole run (INFO commandstats, masters)" >&2
