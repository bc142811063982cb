#!/bin/sh
# Entrypoint of the toolkit-test/postgres images (.ci/images/build): the official postgres
# image's contract, as far as the tests use it. On an empty $PGDATA it runs initdb with
# POSTGRES_USER (default postgres) as the superuser whose password is POSTGRES_PASSWORD
# (required unless POSTGRES_HOST_AUTH_METHOD=trust) and creates POSTGRES_DB (default: the
# user's name). "postgres [ARGS]" then runs the server with ARGS after the image's own
# settings, so "-c name=value" overrides them; any other command runs as given.
# The port is PGPORT (default 5432), which the server honours as the official image's does.
# The server listens on 127.0.0.1 only unless told otherwise (-c listen_addresses=...): the
# tests run these images on the host's network.
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

if [ "${1:-postgres}" != postgres ]; then
    exec "$@"
fi
[ $# -gt 0 ] && shift

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    method="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$method" != trust ]; then
        echo "error: POSTGRES_PASSWORD is not set (or POSTGRES_HOST_AUTH_METHOD=trust)" >&2
        exit 1
    fi
    mkdir -p "$PGDATA"
    chmod 700 "$PGDATA"
    pwfile="$(mktemp)"
    printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --encoding=UTF8 \
        --locale=C.UTF-8 --auth-local=trust --auth-host="$method" > /dev/null
    rm -f "$pwfile"
    echo "host all all all $method" >> "$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        quoted="$(printf '%s' "$db" | sed 's/"/""/g')"
        echo "CREATE DATABASE \"$quoted\"" | postgres --single -D "$PGDATA" -j postgres > /dev/null
    fi
    echo "database system initialised: user $user, database $db"
fi

exec postgres -D "$PGDATA" -c listen_addresses=127.0.0.1 "$@"
