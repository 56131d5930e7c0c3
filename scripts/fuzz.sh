#!/usr/bin/env bash
# Coverage-guided fuzzing on the stable toolchain (README "Fuzzing"): builds the AFL targets of
# fuzz/ with `cargo afl` and runs each, one after the other, for SECONDS (default 30) from its
# seed corpus fuzz/corpus/<target>/. Prints executions, exec/s, crashes and hangs per target.
# Exits non-zero when a target crashed (its crashing inputs are listed), when a seed of the
# corpus crashes (a regression input that crashes again), or when a tool is missing.
#
#   scripts/fuzz.sh [SECONDS]            every target
#   FUZZ_TARGETS="sip rtp" scripts/fuzz.sh 600
#   FUZZ_CARGO_LOCK=/tmp/x.lock ...      wrap the build (only) in `flock` on that file
#
# Needs: cargo-afl (`cargo install cargo-afl`, which also builds its AFL++ runtime; that needs
# make and a C compiler: `apt-get install -y build-essential`). Output: fuzz/out/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${1:-30}
targets=${FUZZ_TARGETS:-sip sdp digest rtp}

die() {
    echo "fuzz.sh: $*" >&2
    exit 2
}

command -v cargo >/dev/null 2>&1 || die "cargo is missing: install the Rust toolchain"
command -v cargo-afl >/dev/null 2>&1 ||
    die "cargo-afl is missing: install it with 'cargo install --locked cargo-afl' (it needs make and a C compiler: 'apt-get install -y build-essential')"
command -v make >/dev/null 2>&1 || die "make is missing: apt-get install -y build-essential"
# `cargo afl fuzz` needs the AFL++ runtime that `cargo install cargo-afl` builds; it exits
# non-zero from `-h` either way, so look for its banner.
banner=$(cargo afl fuzz -h 2>&1 || true)
[[ "$banner" == *afl-fuzz* ]] ||
    die "the AFL++ runtime of cargo-afl is missing: run 'cargo afl config --build --force'"

lock=()
if [ -n "${FUZZ_CARGO_LOCK:-}" ]; then
    lock=(flock "$FUZZ_CARGO_LOCK")
fi
echo "== building the fuzz targets (cargo afl build --release)"
# Not --locked: fuzz/Cargo.lock follows the root crate's dependencies, which change under it.
"${lock[@]}" cargo afl build --release

# As root in CI: no UI, no CPU frequency or core_pattern checks, no CPU pinning (the machine is
# shared), fail rather than wait when a seed misbehaves.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
export AFL_NO_CRASH_README=1 AFL_SHUFFLE_QUEUE=0

stat() { # stat FILE KEY: a value of fuzzer_stats
    sed -n "s/^$2 *: *//p" "$1" | head -n1
}

failed=0
summary=()
mkdir -p out
for t in $targets; do
    [ -d "corpus/$t" ] || die "no corpus for target '$t' (fuzz/corpus/$t)"
    out="out/$t"
    rm -rf "$out"
    echo "== fuzzing $t for ${secs}s (log: fuzz/$out.log)"
    if ! cargo afl fuzz -i "corpus/$t" -o "$out" -V "$secs" -t 2000 -- "target/release/$t" \
        >"$out.log" 2>&1; then
        tail -n 30 "$out.log" >&2
        echo "fuzz.sh: afl-fuzz failed on $t (a seed in fuzz/corpus/$t crashes or hangs?)" >&2
        failed=1
        summary+=("$t: afl-fuzz failed, see fuzz/$out.log")
        continue
    fi
    stats="$out/default/fuzzer_stats"
    [ -f "$stats" ] || die "afl-fuzz wrote no $stats"
    crashes=$(find "$out/default/crashes" -type f -name 'id:*' | wc -l)
    hangs=$(find "$out/default/hangs" -type f -name 'id:*' | wc -l)
    line="$t: $(stat "$stats" execs_done) executions, $(stat "$stats" execs_per_sec) exec/s,"
    line+=" $(stat "$stats" corpus_count) queue entries, $crashes crashes, $hangs hangs"
    summary+=("$line")
    if [ "$crashes" -gt 0 ]; then
        failed=1
        echo "fuzz.sh: $t crashed; inputs (replay with: fuzz/target/release/$t < FILE):" >&2
        find "$out/default/crashes" -type f -name 'id:*' | sed 's|^|  fuzz/|' >&2
    fi
done

echo "== fuzz summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
    echo "fuzz.sh: FAILED" >&2
    exit 1
fi
echo "fuzz.sh: no crash"
