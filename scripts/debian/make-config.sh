#!/usr/bin/env bash
# Writes scripts/debian/sipedge.toml, the configuration the Debian package installs as
# /etc/sipedge/sipedge.toml, from the one source, config/sipedge.toml. Only the paths differ:
# the database and the CDR spool go to /var/lib/sipedge (the service's StateDirectory) by
# absolute path, so that `sipedge user add` run from any directory opens the same database as
# the service.
#
#   scripts/debian/make-config.sh           rewrite scripts/debian/sipedge.toml (commit it)
#   scripts/debian/make-config.sh --check   fail if the committed copy is stale
#                                           (scripts/package-test.sh runs this)
#
# Each rewrite must apply: when config/sipedge.toml changes a line this script expects, it
# fails naming the line instead of packaging a config that points at ./data/.
set -euo pipefail
cd "$(dirname "$0")/../.."

src=config/sipedge.toml
out=scripts/debian/sipedge.toml

generate() {
    sed -e '1s|^# sipedge — the seed deployment\.$|# sipedge — /etc/sipedge/sipedge.toml, installed by the Debian package.\
# (Generated from config/sipedge.toml by scripts/debian/make-config.sh: the same file, with the\
# database and the CDR spool under /var/lib/sipedge. After a change: systemctl reload sipedge,\
# or restart for what a reload cannot change; see README "Install on a server".)|' \
        -e 's|^# \./data/\. On a public host|# /var/lib/sipedge/. On a public host|' \
        -e 's|sipedge check-config -c config/sipedge\.toml|sipedge check-config -c /etc/sipedge/sipedge.toml|' \
        -e 's|^url = "sqlite://data/sipedge\.db"$|url = "sqlite:///var/lib/sipedge/sipedge.db"|' \
        -e 's|^\(# cdr_spool = \)"data/sipedge-cdr\.spool"$|\1"/var/lib/sipedge/sipedge-cdr.spool"|' \
        "$src"
}

text=$(generate)
# Every rewrite above, by its result.
for want in \
    '# sipedge — /etc/sipedge/sipedge.toml, installed by the Debian package.' \
    '# /var/lib/sipedge/. On a public host, set server.advertise (and media.address if media must leave through' \
    '# Check a change with:   sipedge check-config -c /etc/sipedge/sipedge.toml' \
    'url = "sqlite:///var/lib/sipedge/sipedge.db"' \
    '# cdr_spool = "/var/lib/sipedge/sipedge-cdr.spool"'; do
    if ! grep -qxF -- "$want" <<<"$text"; then
        echo "make-config: $src changed; no line became: $want" >&2
        echo "make-config: update the rewrites in $0" >&2
        exit 1
    fi
done
# Nothing relative to the working directory is left.
if left=$(grep -nE '(^|[^a-z/])(\./)?data/|config/sipedge\.toml' <<<"$text" | grep -v 'Generated from config/sipedge.toml'); then
    echo "make-config: relative paths left in the packaged config:" >&2
    echo "$left" >&2
    exit 1
fi

case "${1:-}" in
    "")
        printf '%s\n' "$text" >"$out"
        echo "make-config: wrote $out"
        ;;
    --check)
        if ! diff -u "$out" <(printf '%s\n' "$text") >&2; then
            echo "make-config: $out is stale: run scripts/debian/make-config.sh and commit it" >&2
            exit 1
        fi
        ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac
