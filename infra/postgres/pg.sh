#!/usr/bin/env bash
# A throw-away local PostgreSQL server for the production-profile tests (CI and laptops).
#   infra/postgres/pg.sh start   # install (Debian package) if missing, initdb, start on 127.0.0.1:$HISAM_PG_PORT
#   infra/postgres/pg.sh stop    # stop it and remove its data directory
# Prints the export line for HISAM_TEST_POSTGRES_URL on start. Databases: airflow, mlflow.
# Its own variables, not Postgres' PGDATA/PGPORT: those may name a real cluster, which stop would end
# and delete. It only ever deletes a directory it created (marked by $MARKER).
set -euo pipefail
PORT="${HISAM_PG_PORT:-55432}"
DATA="${HISAM_PG_DATA:-/tmp/hisam-pg-$PORT}"
RUN_AS="${PG_RUN_AS:-postgres}"
MARKER=".hisam-throwaway-postgres"

bin_dir() {  # a server's binaries (initdb), not only a client's
  local dir
  if command -v pg_ctl >/dev/null 2>&1; then
    dir="$(dirname "$(readlink -f "$(command -v pg_ctl)")")"
    if [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  fi
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
    if [ -x "$dir/initdb" ]; then echo "$dir"; return; fi
  done
}

as_user() {  # initdb and postgres refuse to run as root
  if [ "$(id -u)" = "0" ]; then runuser -u "$RUN_AS" -- "$@"; else "$@"; fi
}

start() {
  if [ -z "$(bin_dir)" ]; then
    echo "installing postgresql (Debian package)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null
  fi
  local bin; bin="$(bin_dir)"
  if [ "$(id -u)" = "0" ] && ! id "$RUN_AS" >/dev/null 2>&1; then useradd --system "$RUN_AS"; fi
  stop
  if [ -e "$DATA" ]; then echo "pg.sh: $DATA exists and is not this script's; set HISAM_PG_DATA" >&2; exit 1; fi
  mkdir -p "$DATA/db" && touch "$DATA/$MARKER"
  [ "$(id -u)" = "0" ] && chown -R "$RUN_AS" "$DATA"
  as_user "$bin/initdb" -D "$DATA/db" -U hisam --auth=trust -E UTF8 >/dev/null
  as_user "$bin/pg_ctl" -D "$DATA/db" -o "-c listen_addresses=127.0.0.1 -p $PORT -k '$DATA'" -l "$DATA/server.log" -w start >/dev/null
  for db in airflow mlflow; do as_user "$bin/createdb" -h 127.0.0.1 -p "$PORT" -U hisam "$db"; done
  echo "export HISAM_TEST_POSTGRES_URL=postgresql+psycopg2://hisam@127.0.0.1:$PORT"
}

stop() {  # only a directory this script made: it holds $MARKER, the cluster is in $DATA/db
  [ -f "$DATA/$MARKER" ] || return 0
  local bin; bin="$(bin_dir)"
  if [ -n "$bin" ] && [ -f "$DATA/db/postmaster.pid" ]; then  # after a crash it is stale: go on
    as_user "$bin/pg_ctl" -D "$DATA/db" -m fast -w -t 20 stop >/dev/null 2>&1 || echo "pg.sh: no server stopped in $DATA" >&2
  fi
  rm -rf "$DATA"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
