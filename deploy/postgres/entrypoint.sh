#!/bin/sh
# Initialises the cluster on first start (superuser "postgres"), then runs the server in the
# foreground. The password is read from the environment once and never printed.
set -eu
bin=/usr/lib/postgresql/15/bin
if [ ! -f "$PGDATA/PG_VERSION" ]; then
  if [ -n "${POSTGRES_PASSWORD:-}" ]; then
    pw="$(mktemp)"; printf '%s' "$POSTGRES_PASSWORD" > "$pw"
    "$bin/initdb" -D "$PGDATA" -U postgres -E UTF8 --auth-local=peer --auth-host=scram-sha-256 --pwfile="$pw" >/dev/null
    rm -f "$pw"
  else
    "$bin/initdb" -D "$PGDATA" -U postgres -E UTF8 -A trust --no-sync >/dev/null
  fi
fi
fast=""
[ "${POSTGRES_FAST:-0}" = 1 ] && fast="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
echo "postgres: starting on ${PG_LISTEN}:${PGPORT}"
# shellcheck disable=SC2086
exec "$bin/postgres" -D "$PGDATA" -c "port=${PGPORT}" -c "listen_addresses=${PG_LISTEN}" \
  -c unix_socket_directories=/var/run/postgresql -c max_connections=300 -c shared_buffers=256MB \
  -c log_min_messages=warning $fast
