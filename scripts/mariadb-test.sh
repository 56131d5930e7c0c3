#!/usr/bin/env bash
# The store tests on a real MariaDB (the `mysql` cargo feature): starts the local server if it
# is down, creates a scratch user and database, runs the store tests against it.
# Needs the Debian package mariadb-server (apt-get install -y mariadb-server) and root (to
# start the server and administer it through its unix socket).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mariadbd >/dev/null 2>&1 && ! command -v mysqld >/dev/null 2>&1 \
    && [ ! -x /usr/sbin/mariadbd ] && [ ! -x /usr/sbin/mysqld ]; then
    echo "mariadb-test: MariaDB server not found; install it with: apt-get install -y mariadb-server" >&2
    exit 1
fi
client=$(command -v mariadb || command -v mysql || true)
if [ -z "$client" ]; then
    echo "mariadb-test: the mariadb client is missing; install it with: apt-get install -y mariadb-server" >&2
    exit 1
fi

up() { "$client" -u root -e 'SELECT 1' >/dev/null 2>&1; }
if ! up; then
    # The init script where there is one; else the server directly (containers without init).
    service mariadb start >/dev/null 2>&1 || true
    if ! up; then
        install -d -o mysql -g mysql /run/mysqld
        (mysqld_safe >/dev/null 2>&1 &)
    fi
    for _ in $(seq 1 60); do
        up && break
        sleep 0.5
    done
    if ! up; then
        echo "mariadb-test: the MariaDB server did not start (see /var/log/mysql or journalctl)" >&2
        exit 1
    fi
fi
port=$("$client" -u root -N -B -e 'SELECT @@port')

pw="sipedge-test-$RANDOM$RANDOM"
"$client" -u root <<SQL
DROP DATABASE IF EXISTS sipedge_test;
DROP USER IF EXISTS 'sipedge_test'@'127.0.0.1';
CREATE USER 'sipedge_test'@'127.0.0.1' IDENTIFIED BY '$pw';
CREATE DATABASE sipedge_test;
GRANT ALL PRIVILEGES ON sipedge_test.* TO 'sipedge_test'@'127.0.0.1';
SQL

export SIPEDGE_TEST_MYSQL_URL="mysql://sipedge_test:$pw@127.0.0.1:$port/sipedge_test"
cargo test --features mysql --test e2e store
