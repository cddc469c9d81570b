#!/usr/bin/env bash
# Builds every fuzz target under fuzz/ and runs each for a bounded time, one after the other.
#
#   scripts/fuzz.sh [SECONDS per target, default 60] [TARGET...]
#
# Prints, per target: executions, coverage (libFuzzer's edge count "cov" and feature count
# "ft") and whether it crashed. A crashing input is left in fuzz/artifacts/<target>/; copy it
# to fuzz/regressions/<target>/ so that tests/fuzz_regressions.rs replays it in the normal
# suite once the bug is fixed. New corpus entries a run finds go to fuzz/target/corpus/, not
# into the committed seeds in fuzz/corpus/.
#
# Engine: libFuzzer through the libfuzzer-sys crate, on the stable toolchain. cargo-fuzz wants
# a nightly toolchain for its default sanitizer and machines here have only stable, so the
# script passes the instrumentation cargo-fuzz would itself pass: LLVM's SanitizerCoverage
# (inline 8-bit edge counters, the PC table, comparison tracing), which stable rustc accepts
# through -Cpasses and -Cllvm-args. What is lost without nightly is AddressSanitizer, which
# finds little in these targets: the code they reach is safe Rust, and its bugs show as panics,
# which libFuzzer catches as crashes. Debug assertions and overflow checks are on, so an
# arithmetic overflow is a crash too. The fuzz/ crate keeps cargo-fuzz's layout, so
# `cargo +nightly fuzz run <target>` works too where a nightly toolchain is installed.
set -euo pipefail

seconds="${1:-60}"
shift || true
root="$(cd "$(dirname "$0")/.." && pwd)"
fuzz="$root/fuzz"
host="$(rustc -vV | sed -n 's/^host: //p')"

# Instrumented code must never mix with the normal build: its own target directory, and its
# own build directory, whatever a cargo configuration above this checkout says.
export CARGO_TARGET_DIR="$fuzz/target"
export CARGO_BUILD_BUILD_DIR="$fuzz/target"
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(sed -n 's/^name = "\([a-z_0-9]*\)"$/\1/p' "$fuzz/Cargo.toml" | grep -v '^tessera-fuzz$')
fi

# An explicit --target keeps RUSTFLAGS away from build scripts and proc macros, which run on
# the host and must not be instrumented (they have no libFuzzer to link against).
(cd "$fuzz" && cargo build --release --locked --target "$host" --bins)
bin="$CARGO_TARGET_DIR/$host/release"

# The spool target writes a directory per input; memory-backed storage keeps fsync cheap.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    export TMPDIR=/dev/shm
fi

summary=()
failed=0
for target in "${targets[@]}"; do
    corpus="$CARGO_TARGET_DIR/corpus/$target"
    artifacts="$fuzz/artifacts/$target"
    log="$CARGO_TARGET_DIR/logs/$target.log"
    mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
    echo "== $target: ${seconds}s"
    status=0
    "$bin/$target" "$corpus" "$fuzz/corpus/$target" \
        -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    last="$(grep -E '^#[0-9]+' "$log" | tail -1 || true)"
    cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
    ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
    if [ "$status" -eq 0 ]; then
        result="no crash"
    else
        result="CRASH (exit $status): $(ls -t "$artifacts" | head -1); log $log"
        failed=1
    fi
    line="$(printf '%-17s %12s execs  cov %6s  ft %7s  %s' "$target" "${runs:-?}" "${cov:-?}" "${ft:-?}" "$result")"
    echo "$line"
    summary+=("$line")
done

echo
echo "== summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
exit "$failed"
