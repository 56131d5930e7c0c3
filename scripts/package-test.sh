#!/usr/bin/env bash
# The server install (README "Install on a server"): builds the Debian package with `cargo deb`
# and checks what a server would get from it, then checks the systemd unit with
# `systemd-analyze verify` and the Containerfile's inputs. Exits non-zero on the first
# failure, or when a tool is missing (naming its package); never skips.
#
#   scripts/package-test.sh
#
# Needs: cargo-deb (cargo install --locked cargo-deb), dpkg-deb and dpkg-shlibdeps
# (apt-get install -y dpkg-dev), systemd-analyze (apt-get install -y systemd). It works
# without systemd running: `systemd-analyze verify` reads unit files offline.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

die() {
    echo "package-test: FAIL: $*" >&2
    exit 1
}
checks=0
ok() {
    checks=$((checks + 1))
    echo "package-test: ok: $*"
}

command -v cargo >/dev/null 2>&1 || die "cargo is missing: install the Rust toolchain"
command -v cargo-deb >/dev/null 2>&1 || die "cargo-deb is missing: cargo install --locked cargo-deb"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb is missing: apt-get install -y dpkg"
# cargo-deb's `depends = "$auto"` asks dpkg-shlibdeps which libraries the binary needs.
command -v dpkg-shlibdeps >/dev/null 2>&1 || die "dpkg-shlibdeps is missing: apt-get install -y dpkg-dev"
command -v readelf >/dev/null 2>&1 || die "readelf is missing: apt-get install -y binutils (dpkg-dev needs it too)"
command -v systemd-analyze >/dev/null 2>&1 || die "systemd-analyze is missing: apt-get install -y systemd"
command -v flock >/dev/null 2>&1 || die "flock is missing: apt-get install -y util-linux"

work=$(mktemp -d /tmp/sipedge-package.XXXXXX)
trap 'rm -rf "$work"' EXIT

# 1. The packaged config is config/sipedge.toml with absolute state paths, and up to date.
scripts/debian/make-config.sh --check || die "scripts/debian/sipedge.toml is stale"
ok "scripts/debian/sipedge.toml is config/sipedge.toml with the paths under /var/lib/sipedge"

# 2. The package. (cargo deb builds the release binary first.)
flock /tmp/sipedge-cargo.lock cargo deb --locked --output "$work/" >"$work/cargo-deb.out" 2>&1 ||
    { cat "$work/cargo-deb.out" >&2; die "cargo deb failed"; }
debs=("$work"/sipedge_*.deb)
[ ${#debs[@]} = 1 ] && [ -f "${debs[0]}" ] || die "cargo deb wrote no single sipedge_*.deb: ${debs[*]}"
deb=${debs[0]}
# The line tables of the release profile go to a separate debug-symbols package.
dbgsyms=("$work"/sipedge-dbgsym_*.ddeb)
[ ${#dbgsyms[@]} = 1 ] && [ -f "${dbgsyms[0]}" ] || die "cargo deb wrote no sipedge-dbgsym_*.ddeb"
dbgsym=${dbgsyms[0]}
ok "built $(basename "$deb") ($(stat -c %s "$deb") bytes) and $(basename "$dbgsym") ($(stat -c %s "$dbgsym") bytes)"

# The control fields.
info=$(dpkg-deb -I "$deb")
field() { dpkg-deb -f "$deb" "$1"; }
[ "$(field Package)" = sipedge ] || die "Package: $(field Package)"
[ "$(field Section)" = net ] || die "Section: $(field Section)"
[ "$(field Priority)" = optional ] || die "Priority: $(field Priority)"
[ "$(field Version)" = "$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)-1" ] ||
    die "Version: $(field Version), not Cargo.toml's version"
depends=$(field Depends)
[[ "$depends" == *libc6* ]] || die "Depends has no libc6 (dpkg-shlibdeps not used?): $depends"
[[ "$depends" == *adduser* ]] || die "Depends has no adduser (postinst needs it): $depends"
[ -n "$(field Maintainer)" ] || die "no Maintainer"
[[ "$(field Description)" == *"RTP media relay"* ]] || die "Description: $(field Description)"
ok "control: Package sipedge $(field Version), Section net, Priority optional, Depends: $depends"

# The files, with their owners and modes: `dpkg-deb --contents` lists `mode owner/group size
# date time ./path` (cargo-deb writes owners as 0/0, root).
contents=$(dpkg-deb --contents "$deb")
has() { # PATH MODE
    local line
    line=$(awk -v p="./$1" '$6 == p' <<<"$contents")
    [ -n "$line" ] || die "not in the package: /$1 (contents: $(awk '{print $6}' <<<"$contents" | tr '\n' ' '))"
    [[ "$line" == "$2 0/0 "* || "$line" == "$2 root/root "* ]] || die "/$1: want $2 root, got: $line"
}
has usr/bin/sipedge -rwxr-xr-x
# /usr/lib, not /lib: systemd reads both, and merged-/usr Debian (12 and later) ships units there.
has usr/lib/systemd/system/sipedge.service -rw-r--r--
has etc/sipedge/sipedge.toml -rw-r-----
has usr/share/doc/sipedge/README.md -rw-r--r--
has usr/share/doc/sipedge/LICENSE-MIT -rw-r--r--
has usr/share/doc/sipedge/LICENSE-APACHE -rw-r--r--
has usr/share/doc/sipedge/copyright -rw-r--r--
[ "$(awk '{print $6}' <<<"$contents" | grep -c '^\./usr/lib/debug/')" = 0 ] ||
    die "debug symbols in the main package"
ok "contents: the binary, the unit, the config (0640), README, both licenses, copyright"
dbg_contents=$(dpkg-deb --contents "$dbgsym")
grep -Eq ' \./usr/lib/debug/\.build-id/[0-9a-f]{2}/[0-9a-f]+\.debug$' <<<"$dbg_contents" ||
    die "no .debug file under /usr/lib/debug/.build-id in $(basename "$dbgsym")"
[ "$(dpkg-deb -f "$dbgsym" Package)" = sipedge-dbgsym ] || die "dbgsym Package: $(dpkg-deb -f "$dbgsym" Package)"
ok "sipedge-dbgsym: the line tables under /usr/lib/debug/.build-id"

# The config is a conffile, listed once: dpkg keeps the administrator's edits on upgrade.
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)
[ "$conffiles" = /etc/sipedge/sipedge.toml ] || die "conffiles: want only /etc/sipedge/sipedge.toml, got: $conffiles"
ok "conffiles: /etc/sipedge/sipedge.toml"

# The maintainer scripts: postinst creates the user and the state directory, and cargo-deb
# put its systemd snippets in place of #DEBHELPER#; prerm/postrm stop, disable and purge.
mkdir "$work/control"
dpkg-deb -e "$deb" "$work/control"
postinst=$work/control/postinst
[ -x "$postinst" ] || die "no executable postinst"
grep -q 'adduser --system --group' "$postinst" || die "postinst creates no sipedge user"
grep -q 'install -d -o sipedge -g sipedge -m 0750 /var/lib/sipedge' "$postinst" ||
    die "postinst creates no /var/lib/sipedge"
grep -q '#DEBHELPER#' "$postinst" && die "postinst: #DEBHELPER# was not replaced"
# Each snippet once, after the user is created (a second debhelper token, even in a comment,
# would get a copy of them all).
[ "$(grep -c 'deb-systemd-helper update-state sipedge.service' "$postinst")" = 1 ] ||
    die "postinst: the systemd snippets are not there exactly once"
[ "$(grep -n 'deb-systemd-helper update-state' "$postinst" | cut -d: -f1)" -gt \
    "$(grep -n 'install -d -o sipedge' "$postinst" | cut -d: -f1)" ] ||
    die "postinst: the systemd snippets run before the user and its directory exist"
# First install: not enabled, not started (the config needs server.advertise first); an
# upgrade restarts a running service.
grep -q 'deb-systemd-helper enable sipedge.service' "$postinst" && grep -q 'was-enabled' "$postinst" ||
    die "postinst should enable sipedge.service only if it was enabled before"
grep -q 'try-restart' "$postinst" || die "postinst should try-restart sipedge.service on upgrade"
for s in prerm postrm; do
    [ -x "$work/control/$s" ] || die "no executable $s"
done
grep -q 'deb-systemd-invoke stop sipedge.service' "$work/control/prerm" || die "prerm does not stop the service"
grep -q 'deb-systemd-helper purge sipedge.service' "$work/control/postrm" || die "postrm does not purge the unit state"
for s in postinst prerm postrm; do
    sh -n "$work/control/$s" || die "$s: shell syntax error"
done
ok "maintainer scripts: user + /var/lib/sipedge, enable only if enabled before, try-restart on upgrade, stop on removal"

# What a server gets: the packaged files are the repository's, and the packaged binary accepts
# the packaged config with the database and the spool under /var/lib/sipedge.
mkdir "$work/root"
dpkg-deb -x "$deb" "$work/root"
cmp "$work/root/usr/lib/systemd/system/sipedge.service" scripts/sipedge.service ||
    die "the packaged unit differs from scripts/sipedge.service"
cmp "$work/root/etc/sipedge/sipedge.toml" scripts/debian/sipedge.toml ||
    die "the packaged config differs from scripts/debian/sipedge.toml"
bin=$work/root/usr/bin/sipedge
# Stripped: no line tables or DWARF info in the main package (they are in the dbgsym package;
# .debug_gdb_scripts is an allocated section Rust keeps).
readelf -SW "$bin" | grep -Eq '\.debug_(info|line) ' && die "/usr/bin/sipedge is not stripped"
"$bin" --version | grep -qx "sipedge $(field Version | sed 's/-1$//')" || die "sipedge --version: $("$bin" --version)"
effective=$("$bin" -c "$work/root/etc/sipedge/sipedge.toml" check-config 2>"$work/check.err") ||
    { cat "$work/check.err" >&2; die "the packaged binary refuses the packaged config"; }
grep -qxF 'url = "sqlite:///var/lib/sipedge/sipedge.db"' <<<"$effective" ||
    die "effective database.url is not sqlite:///var/lib/sipedge/sipedge.db"
grep -qxF 'cdr_spool = "/var/lib/sipedge/sipedge-cdr.spool"' <<<"$effective" ||
    die "effective media.cdr_spool is not /var/lib/sipedge/sipedge-cdr.spool"
# The routes stay commented out, as in config/sipedge.toml.
grep -q '^\[\[route\]\]' "$work/root/etc/sipedge/sipedge.toml" && die "the packaged config has active routes"
ok "packaged binary $("$bin" --version) accepts the packaged config: database and spool under /var/lib/sipedge"

# 3. The unit, as systemd reads it. `systemd-analyze verify` needs the ExecStart binary to
# exist, so it checks a copy that runs the packaged binary; it only warns about unknown keys
# and bad values (exit 0), so any output fails.
mkdir "$work/unit"
sed "s|^ExecStart=/usr/bin/sipedge |ExecStart=$bin |" scripts/sipedge.service >"$work/unit/sipedge.service"
grep -q "^ExecStart=$bin -c /etc/sipedge/sipedge.toml serve$" "$work/unit/sipedge.service" ||
    die "scripts/sipedge.service: ExecStart is not /usr/bin/sipedge -c /etc/sipedge/sipedge.toml serve"
verify_out=$(cd "$work/unit" && systemd-analyze verify sipedge.service 2>&1) ||
    { echo "$verify_out" >&2; die "systemd-analyze verify failed"; }
[ -z "$verify_out" ] || { echo "$verify_out" >&2; die "systemd-analyze verify warned"; }
# (The check can fail: a unit with a typo must be reported.)
sed 's/^ProtectSystem=strict$/ProtectSystem=stric/' "$work/unit/sipedge.service" >"$work/unit/broken.service"
broken_out=$(cd "$work/unit" && systemd-analyze verify broken.service 2>&1 || true)
[[ "$broken_out" == *"broken.service:"*stric* ]] || die "systemd-analyze verify did not notice a bad value: $broken_out"
unit() { sed -n "s/^$1=//p" scripts/sipedge.service; }
[ "$(unit Type)" = simple ] || die "Type=$(unit Type)"
[ "$(unit ExecReload)" = '/bin/kill -HUP $MAINPID' ] || die "ExecReload=$(unit ExecReload)"
[ "$(unit User)" = sipedge ] || die "User=$(unit User)"
[ "$(unit StateDirectory)" = sipedge ] || die "StateDirectory=$(unit StateDirectory)"
[ "$(unit ProtectSystem)" = strict ] || die "ProtectSystem=$(unit ProtectSystem)"
[ "$(unit RestrictAddressFamilies)" = "AF_INET AF_INET6 AF_UNIX" ] ||
    die "RestrictAddressFamilies=$(unit RestrictAddressFamilies)"
ok "systemd-analyze verify: sipedge.service clean ($(systemd-analyze --version | head -1))"

# 4. The Containerfile is not built here (no container engine): its COPY sources must exist,
# and it must run the binary with the packaged config as a non-root user.
while read -r src; do
    [ -e "$src" ] || die "Containerfile copies $src, which does not exist"
done < <(awk '$1 == "COPY" && $2 !~ /^--from=/ { for (i = 2; i < NF; i++) if ($i !~ /^--/) print $i }' Containerfile)
grep -qx 'USER sipedge' Containerfile || die "Containerfile does not switch to the sipedge user"
grep -qxF 'ENTRYPOINT ["/usr/bin/sipedge", "-c", "/etc/sipedge/sipedge.toml"]' Containerfile ||
    die "Containerfile ENTRYPOINT is not /usr/bin/sipedge -c /etc/sipedge/sipedge.toml"
ok "Containerfile: inputs exist, runs as sipedge with /etc/sipedge/sipedge.toml"

echo "package-test: $checks passed, 0 failed"
