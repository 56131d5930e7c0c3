#!/usr/bin/env bash
# The store tests on a real PostgreSQL (the `postgres` cargo feature): starts the local
# cluster if it is down, creates a scratch role and database, runs the store tests against it.
# Needs the Debian package postgresql (apt-get install -y postgresql) and root (to start the
# cluster and become the postgres user).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v pg_lsclusters >/dev/null 2>&1 || ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    echo "postgres-test: PostgreSQL not found; install it with: apt-get install -y postgresql" >&2
    exit 1
fi
read -r ver name port status _ < <(pg_lsclusters -h | head -1) || true
if [ -z "${ver:-}" ]; then
    echo "postgres-test: no PostgreSQL cluster; create one with: pg_createcluster --start 15 main" >&2
    exit 1
fi
if [ "$status" != "online" ]; then
    pg_ctlcluster "$ver" "$name" start
fi

pw="sipedge-test-$RANDOM$RANDOM"
su postgres -c "psql -q -p $port -v ON_ERROR_STOP=1" <<SQL
DROP DATABASE IF EXISTS sipedge_test;
DROP ROLE IF EXISTS sipedge_test;
CREATE ROLE sipedge_test LOGIN PASSWORD '$pw';
CREATE DATABASE sipedge_test OWNER sipedge_test;
SQL

export SIPEDGE_TEST_POSTGRES_URL="postgres://sipedge_test:$pw@127.0.0.1:$port/sipedge_test"
cargo test --features postgres --test e2e store
# Two instances on that database (README "Several instances"); after the store tests, since
# both empty the tables.
cargo test --features postgres --test e2e multi::
