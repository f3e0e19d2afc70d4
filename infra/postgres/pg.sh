#!/usr/bin/env bash
# A throw-away local PostgreSQL server for the production-profile tests (CI and laptops).
#   infra/postgres/pg.sh start   # install (Debian package) if missing, initdb, start on 127.0.0.1:$PGPORT
#   infra/postgres/pg.sh stop    # stop it and remove its data directory
# Prints the export line for HISAM_TEST_POSTGRES_URL on start. Databases: airflow, mlflow.
set -euo pipefail
PGPORT="${PGPORT:-55432}"
PGDATA="${PGDATA:-/tmp/hisam-pg-$PGPORT}"
RUN_AS="${PG_RUN_AS:-postgres}"

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
  rm -rf "$PGDATA"; mkdir -p "$PGDATA"
  [ "$(id -u)" = "0" ] && chown "$RUN_AS" "$PGDATA"
  as_user "$bin/initdb" -D "$PGDATA" -U hisam --auth=trust -E UTF8 >/dev/null
  as_user "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $PGDATA" -l "$PGDATA/server.log" -w start >/dev/null
  for db in airflow mlflow; do as_user "$bin/createdb" -h 127.0.0.1 -p "$PGPORT" -U hisam "$db"; done
  echo "export HISAM_TEST_POSTGRES_URL=postgresql+psycopg2://hisam@127.0.0.1:$PGPORT"
}

stop() {
  local bin; bin="$(bin_dir)"
  if [ -n "$bin" ] && [ -f "$PGDATA/postmaster.pid" ]; then as_user "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null; fi
  rm -rf "$PGDATA"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
