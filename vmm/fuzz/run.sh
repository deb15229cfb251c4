#!/bin/sh
# Runs each virtio fuzz target for a bounded time and prints libFuzzer's
# figures per target. See docs/fuzzing.md.
#
#   vmm/fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default: $FUZZ_SECONDS, else 60); TARGETs default to
# all (`cargo fuzz list`). Environment:
#   FUZZ_SANITIZER  address (default) or none (faster; panics still count)
#   FUZZ_NICE       nice level for build and runs (default 10)
#   FUZZ_ARGS       extra libFuzzer flags, e.g. "-max_len=8192"
#
# The corpus grows in vmm/fuzz/corpus/TARGET, crashes land in
# vmm/fuzz/artifacts/TARGET, logs in vmm/fuzz/logs/TARGET.log (all ignored
# by git). Exit status 1 if any target crashed, 2 if cargo-fuzz is missing.
set -u
cd "$(dirname "$0")/.." || exit 2 # vmm/: cargo-fuzz looks for fuzz/ here

secs=${1:-${FUZZ_SECONDS:-60}}
[ $# -gt 0 ] && shift
sanitizer=${FUZZ_SANITIZER:-address}
nicelvl=${FUZZ_NICE:-10}

# cargo-fuzz passes nightly-only flags to rustc (-Zsanitizer, the
# sanitizer-coverage passes). The toolchain here is stable; RUSTC_BOOTSTRAP=1
# makes stable rustc accept them (its sanitizer runtimes ship with it).
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi

targets=${*:-$(cargo fuzz list)}
nice -n "$nicelvl" cargo fuzz build --sanitizer "$sanitizer" || exit 2

mkdir -p fuzz/logs
failed=""
summary=""
for t in $targets; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    echo "== $t: ${secs}s"
    # shellcheck disable=SC2086
    nice -n "$nicelvl" cargo fuzz run --sanitizer "$sanitizer" "$t" -- \
        -max_total_time="$secs" -print_final_stats=1 ${FUZZ_ARGS:-} \
        >"fuzz/logs/$t.log" 2>&1
    rc=$?
    log="fuzz/logs/$t.log"
    execs=$(grep -a '^stat::number_of_executed_units:' "$log" | tail -n 1 | tr -dc 0-9)
    rate=$(grep -a '^stat::average_exec_per_sec:' "$log" | tail -n 1 | tr -dc 0-9)
    last=$(grep -aE '^#[0-9]+[[:space:]]+(DONE|NEW|REDUCE|pulse|INITED|RELOAD)' "$log" | tail -n 1)
    cov=$(echo "$last" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    ft=$(echo "$last" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    crashes=$(find "fuzz/artifacts/$t" -type f | wc -l)
    line="$t: execs=${execs:-?} exec/s=${rate:-?} cov=${cov:-?} ft=${ft:-?} corpus=$corpus artifacts=$crashes rc=$rc"
    echo "$line"
    summary="$summary$line
"
    if [ "$rc" -ne 0 ]; then
        failed="$failed $t"
        grep -E "panicked at|ERROR: AddressSanitizer|SUMMARY" "$log" | head -n 5
        echo "   full log: vmm/$log; reproduce: cd vmm && RUSTC_BOOTSTRAP=1 cargo fuzz run $t fuzz/artifacts/$t/<file>"
    fi
done

echo
echo "== summary (${secs}s per target, sanitizer $sanitizer)"
printf '%s' "$summary"
if [ -n "$failed" ]; then
    echo "FAILED:$failed"
    exit 1
fi
