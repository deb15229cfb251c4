#!/bin/bash
# Per-VMM private memory of the shipped binary (docs/benchmarks.md, "Static
# PIE"): starts three probe VMMs with BIN, asks each for /stats, and prints,
# per process, the smaps fields of the binary's own mappings and the
# process's total private memory. The VMMs are stopped on exit.
#   usage: benches/scripts/text-sharing.sh [BIN]   (default target/vmm/ksmvm)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=$(realpath "${1:-target/vmm/ksmvm}")
PROBE=guest-image/probe/target/release/probe
RUNDIR=$(mktemp -d)
export KSMVM_RUNTIME_DIR=$RUNDIR
pids=()
cleanup() {
    ((${#pids[@]})) && kill -TERM "${pids[@]}" 2>/dev/null && wait 2>/dev/null
    rm -rf "$RUNDIR"
}
trap cleanup EXIT
for i in 1 2 3; do
    "$BIN" run --name share$i --kernel "$PROBE" --cmdline console=ttyS0 --mem-mib 64 \
        --shutdown-timeout-s 0 >/dev/null 2>&1 &
    pids+=($!)
done
for i in 1 2 3; do
    for _ in $(seq 50); do [[ -S $RUNDIR/share$i.sock ]] && break; sleep 0.1; done
    curl -s --unix-socket "$RUNDIR/share$i.sock" http://vm/stats >/dev/null
done
sync
for p in "${pids[@]}"; do
    python3 - "$p" "$BIN" <<'PY'
import re, sys
pid, binary = sys.argv[1], sys.argv[2]
keys = ("Rss", "Shared_Clean", "Private_Clean", "Private_Dirty")
mapping, whole, own = None, {}, {}
for line in open(f"/proc/{pid}/smaps"):
    m = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$", line)
    if m:
        mapping = m.group(1)
        continue
    k, _, v = line.partition(":")
    if k in keys:
        kb = int(v.split()[0])
        whole[k] = whole.get(k, 0) + kb
        if mapping == binary:
            own[k] = own.get(k, 0) + kb
print(f"pid {pid}: binary {own}; process private "
      f"{whole['Private_Clean'] + whole['Private_Dirty']} KiB (Rss {whole['Rss']} KiB)")
PY
done
