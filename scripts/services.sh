#!/usr/bin/env bash
# Makes Redis 7 and MariaDB 10.11 available on 127.0.0.1.
#
#   scripts/services.sh          # start (idempotent)
#   scripts/services.sh start mysql|redis   # only one of them
#   scripts/services.sh stop     # stop only the private instances this script started
#   scripts/services.sh status
#   scripts/services.sh cluster  # a local Redis Cluster: 3 masters, one replica each
#   scripts/services.sh stop cluster
#   scripts/services.sh tools    # what the checks beyond cargo need: python3-cryptography
#                                # for the independent token verifier (docs/verify/)
#   scripts/services.sh browser  # headless Chromium and selenium for the pages' tests
#   scripts/services.sh promtool # promtool (Debian's prometheus package) for
#                                # scripts/check-deploy.sh
#
# A server already answering at the configured port is used as it is. Otherwise the
# Debian packages are installed when missing and private instances are started with
# their data under .data/ and the configuration files shipped in config/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${RPW_DATA_DIR:-$ROOT/.data}"
REDIS_PORT="${RPW_REDIS_PORT:-6379}"
MYSQL_PORT="${RPW_MYSQL_PORT:-3306}"
MYSQL_USER="${RPW_MYSQL_USER:-rpw}"
MYSQL_PASSWORD="${RPW_MYSQL_PASSWORD:-rpw}"
MYSQL_DB="${RPW_MYSQL_DB:-rpw}"
CLUSTER_PORT="${RPW_CLUSTER_BASE_PORT:-7000}"
CLUSTER_NODES=6

log() { printf '[services] %s\n' "$*" >&2; }

redis_answers() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || exit 1
    printf 'PING\r\n' >&3
    reply=""
    read -r -t 2 reply <&3 || true
    [[ "$reply" == +PONG* ]]
  ) 2>/dev/null
}

mysql_port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$MYSQL_PORT") 2>/dev/null
}

mysql_client() {
  if command -v mariadb >/dev/null 2>&1; then echo mariadb; else echo mysql; fi
}

mysql_answers() {
  mysql_port_open || return 1
  command -v "$(mysql_client)" >/dev/null 2>&1 || return 1
  "$(mysql_client)" --protocol=TCP -h127.0.0.1 -P"$MYSQL_PORT" -u"$MYSQL_USER" -p"$MYSQL_PASSWORD" \
    -e 'SELECT 1' >/dev/null 2>&1
}

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "installing ${missing[*]} (apt-get)"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  # Keep the packages' own init scripts from starting system-wide daemons: this
  # script starts private instances and must never own servers it did not start.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    created_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >"$DATA/apt.log" 2>&1; then
    $sudo apt-get update -q >>"$DATA/apt.log" 2>&1
    $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$DATA/apt.log" 2>&1 \
      || { log "apt-get failed, see $DATA/apt.log"; tail -20 "$DATA/apt.log" >&2; exit 1; }
  fi
  [[ $created_policy -eq 1 ]] && $sudo rm -f "$policy"
  return 0
}

wait_for() {
  local what="$1" check="$2" tries="${3:-60}"
  for ((i = 0; i < tries; i++)); do
    if $check; then return 0; fi
    sleep 0.5
  done
  log "$what did not come up"
  return 1
}

start_redis() {
  if redis_answers; then
    log "redis: using the server answering on 127.0.0.1:$REDIS_PORT"
    return 0
  fi
  apt_install redis-server
  mkdir -p "$DATA/redis"
  log "redis: starting a private instance on 127.0.0.1:$REDIS_PORT (data in $DATA/redis)"
  redis-server "$ROOT/config/redis.conf" --port "$REDIS_PORT" --dir "$DATA/redis" \
    --pidfile "$DATA/redis/redis.pid" --logfile "$DATA/redis/redis.log"
  wait_for redis redis_answers || { tail -20 "$DATA/redis/redis.log" >&2; exit 1; }
}

start_mysql() {
  if mysql_answers; then
    log "mariadb: using the server answering on 127.0.0.1:$MYSQL_PORT"
    return 0
  fi
  if mysql_port_open && [[ ! -f "$DATA/mysql/mariadb.pid" ]]; then
    log "mariadb: something listens on 127.0.0.1:$MYSQL_PORT but does not accept $MYSQL_USER/$MYSQL_PASSWORD;"
    log "         grant that user ALL on *.* there, or choose another port with RPW_MYSQL_PORT"
    exit 1
  fi
  apt_install mariadb-server mariadb-client
  local dir="$DATA/mysql"
  mkdir -p "$dir"
  if [[ ! -d "$dir/data/mysql" ]]; then
    log "mariadb: initialising $dir/data"
    mariadb-install-db --no-defaults --user="$(id -un)" --datadir="$dir/data" \
      --auth-root-authentication-method=socket --skip-test-db >"$dir/install.log" 2>&1 \
      || { tail -20 "$dir/install.log" >&2; exit 1; }
  fi
  if ! mysql_port_open; then
    log "mariadb: starting a private instance on 127.0.0.1:$MYSQL_PORT (data in $dir/data)"
    setsid nohup mariadbd --defaults-file="$ROOT/config/mariadb.cnf" --user="$(id -un)" \
      --datadir="$dir/data" --port="$MYSQL_PORT" --socket="$dir/mariadb.sock" \
      --pid-file="$dir/mariadb.pid" --log-error="$dir/error.log" >/dev/null 2>&1 </dev/null &
    wait_for mariadb mysql_port_open 120 || { tail -20 "$dir/error.log" >&2; exit 1; }
  fi
  # The application user may create databases: every test gets a database of its own.
  mariadb --no-defaults -uroot --socket="$dir/mariadb.sock" <<SQL
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'127.0.0.1' IDENTIFIED BY '$MYSQL_PASSWORD';
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASSWORD';
GRANT ALL PRIVILEGES ON *.* TO '$MYSQL_USER'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO '$MYSQL_USER'@'localhost';
CREATE DATABASE IF NOT EXISTS \`$MYSQL_DB\`;
FLUSH PRIVILEGES;
SQL
  wait_for mariadb mysql_answers || exit 1
}

cluster_ports() {
  local i
  for ((i = 0; i < CLUSTER_NODES; i++)); do echo $((CLUSTER_PORT + i)); done
}

node_answers() {
  redis-cli -h 127.0.0.1 -p "$1" PING 2>/dev/null | grep -q PONG
}

cluster_ok() {
  local port
  for port in $(cluster_ports); do
    redis-cli -h 127.0.0.1 -p "$port" CLUSTER INFO 2>/dev/null | grep -q 'cluster_state:ok' || return 1
  done
  # Every master has its replica.
  [[ $(redis-cli -h 127.0.0.1 -p "$CLUSTER_PORT" CLUSTER NODES 2>/dev/null | grep -c slave) -ge 3 ]]
}

# Three masters with one replica each on 127.0.0.1:$CLUSTER_PORT.., data under
# .data/cluster/<port>, from the Debian redis-server package alone. Idempotent: nodes
# already answering are kept, a cluster already formed is used as it is.
start_cluster() {
  apt_install redis-server
  local port dir
  for port in $(cluster_ports); do
    if node_answers "$port"; then continue; fi
    dir="$DATA/cluster/$port"
    mkdir -p "$dir"
    log "redis cluster: starting node 127.0.0.1:$port (data in $dir)"
    redis-server "$ROOT/config/redis.conf" --port "$port" --dir "$dir" \
      --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
      --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout "${RPW_CLUSTER_NODE_TIMEOUT_MS:-2000}" \
      --cluster-replica-validity-factor 0 --appendonly yes
  done
  for port in $(cluster_ports); do
    wait_for "redis cluster node $port" "node_answers $port" || { tail -20 "$DATA/cluster/$port/redis.log" >&2; exit 1; }
  done
  if ! cluster_ok; then
    local known
    known="$(redis-cli -h 127.0.0.1 -p "$CLUSTER_PORT" CLUSTER INFO 2>/dev/null | grep -c 'cluster_known_nodes:6' || true)"
    if [[ $known -eq 0 ]]; then
      log "redis cluster: creating 3 masters with one replica each"
      local nodes=()
      for port in $(cluster_ports); do nodes+=("127.0.0.1:$port"); done
      redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$DATA/cluster/create.log" 2>&1 \
        || { tail -20 "$DATA/cluster/create.log" >&2; exit 1; }
    fi
    wait_for "redis cluster" cluster_ok 120 || { redis-cli -p "$CLUSTER_PORT" CLUSTER INFO >&2; exit 1; }
  fi
  log "redis cluster: ok on 127.0.0.1:$CLUSTER_PORT-$((CLUSTER_PORT + CLUSTER_NODES - 1))"
}

cluster_urls() {
  local port urls=()
  for port in $(cluster_ports); do urls+=("redis://127.0.0.1:$port"); done
  (IFS=,; echo "${urls[*]}")
}

stop_private() {
  local pidfile files=()
  [[ $1 == all || $1 == redis ]] && files+=("$DATA/redis/redis.pid")
  [[ $1 == all || $1 == mysql ]] && files+=("$DATA/mysql/mariadb.pid")
  if [[ $1 == all || $1 == cluster ]]; then
    local port
    for port in $(cluster_ports); do files+=("$DATA/cluster/$port/redis.pid"); done
  fi
  for pidfile in "${files[@]}"; do
    if [[ -f $pidfile ]]; then
      local pid
      pid="$(cat "$pidfile")"
      if kill -0 "$pid" 2>/dev/null; then
        log "stopping pid $pid ($pidfile)"
        kill "$pid"
        for ((i = 0; i < 60; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      fi
      rm -f "$pidfile"
    fi
  done
}

mkdir -p "$DATA"
WHICH="${2:-all}"
case "${1:-start}" in
  start)
    [[ $WHICH == all || $WHICH == redis ]] && start_redis
    [[ $WHICH == all || $WHICH == mysql ]] && start_mysql
    echo "RPW_REDIS__URL=redis://127.0.0.1:$REDIS_PORT"
    echo "RPW_MYSQL__URL=mysql://$MYSQL_USER:$MYSQL_PASSWORD@127.0.0.1:$MYSQL_PORT/$MYSQL_DB"
    ;;
  cluster)
    start_cluster
    echo "RPW_REDIS__CLUSTER_URLS=$(cluster_urls)"
    ;;
  tools)
    python3 -c 'import cryptography' 2>/dev/null || apt_install python3 python3-cryptography
    ;;
  browser)
    # The pages' tests: headless Chromium driven over WebDriver by Python's selenium.
    apt_install chromium chromium-driver python3-selenium fonts-dejavu-core
    ;;
  promtool)
    # promtool checks and unit-tests deploy/prometheus/ (scripts/check-deploy.sh). It
    # ships in Debian's prometheus package; its server is never started here.
    command -v promtool >/dev/null 2>&1 || apt_install prometheus
    ;;
  stop) stop_private "$WHICH" ;;
  status)
    redis_answers && log "redis answers on $REDIS_PORT" || log "redis down on $REDIS_PORT"
    mysql_answers && log "mariadb answers on $MYSQL_PORT" || log "mariadb down on $MYSQL_PORT"
    cluster_ok && log "redis cluster ok on $CLUSTER_PORT.." || log "no redis cluster on $CLUSTER_PORT.."
    ;;
  *) echo "usage: $0 [start|stop|status|cluster|tools|browser|promtool] [redis|mysql|cluster]" >&2; exit 2 ;;
esac
