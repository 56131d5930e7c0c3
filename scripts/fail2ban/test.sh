#!/bin/sh
# Checks the fail2ban filter against sample.log (lines written by sipedge in the e2e tests
# `security::*`, plus hand-made attempts to smuggle an address into a line) with the real
# fail2ban-regex: in the form sipedge writes to a file, and behind a syslog prefix.
# Needs fail2ban (apt-get install fail2ban). Exit 0 = as expected.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
command -v fail2ban-regex >/dev/null || { echo "fail2ban-regex missing: apt-get install -y fail2ban" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The filter includes common.conf (for the syslog prefix), next to it as in filter.d/.
cp /etc/fail2ban/filter.d/common.conf "$here/sipedge.conf" "$tmp/"
sed -E 's/^(\S+)  /Dec  4 15:53:47 edge1 sipedge[4242]: \1  /' "$here/sample.log" > "$tmp/syslog.log"

fail=0
for log in "$here/sample.log" "$tmp/syslog.log"; do
    # The addresses fail2ban would ban, in order (fail2ban-regex -o ip prints what <HOST>
    # captured, one per matched line).
    hosts=$(fail2ban-regex -o ip "$log" "$tmp/sipedge.conf" | tr '\n' ' ')
    want="127.0.0.2 127.0.0.2 127.0.0.2 192.0.2.7 2001:db8::7 "
    if [ "$hosts" != "$want" ]; then
        echo "FAIL $(basename "$log"): fail2ban bans [$hosts], want [$want]"
        fail2ban-regex --print-all-matched "$log" "$tmp/sipedge.conf" || true
        fail=1
    else
        echo "ok   $(basename "$log"): auth_failed, ban and nonce_replay matched on the real peer;" \
            "user_locked, user_lock and the injected addresses not"
    fi
done
exit $fail
