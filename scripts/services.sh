#!/usr/bin/env bash
# Makes Redis 7 and MariaDB 10.11 available on 127.0.0.1.
#
#   scripts/services.sh          # start (idempotent)
#   scripts/services.sh start mysql|redis   # only one of them
#   scripts/services.sh stop     # stop only the private instances this script started
#   scripts/services.sh status
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

stop_private() {
  local pidfile files=()
  [[ $1 == all || $1 == redis ]] && files+=("$DATA/redis/redis.pid")
  [[ $1 == all || $1 == mysql ]] && files+=("$DATA/mysql/mariadb.pid")
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
  stop) stop_private "$WHICH" ;;
  status)
    redis_answers && log "redis answers on $REDIS_PORT" || log "redis down on $REDIS_PORT"
    mysql_answers && log "mariadb answers on $MYSQL_PORT" || log "mariadb down on $MYSQL_PORT"
    ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
