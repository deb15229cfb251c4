#!/usr/bin/env bash
# Memory profile of idle Mastodon guests: create N independent instances
# (own data disks, secrets, machine ids), boot them at the same time under
# QEMU/TCG with file-backed guest RAM, let each idle IDLE seconds after its
# ready marker, capture its RAM, and run memprofile over the captures.
#
#   capture-memory.sh KERNEL ROOTFS OUTDIR [N]
#
# OUTDIR gets, per instance NAME: NAME.data.ext4, NAME.toml, NAME.run/
# (console log), NAME.ram (the captured RAM, sparse) and NAME.ram.meta;
# and report.txt / report.json from memprofile, plus the first instance's
# non-zero pages with their classes as a KSMVMRAM pack (NAME.ksmvmram; the
# format is described in memprofile's write_pack) for a probe guest.
# Environment: IDLE (seconds after the marker, default 150), MEM_MIB (1024),
# TIMEOUT (per boot, default 2400), MEMPROFILE (path of the binary).
set -euo pipefail
PROG=capture-memory
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
[[ $# -ge 3 ]] || die "usage: capture-memory.sh KERNEL ROOTFS OUTDIR [N]"
KERNEL="$1" ROOTFS="$2" OUTDIR="$3" N="${4:-2}"
(( N >= 2 )) || die "N must be at least 2"
MEMPROFILE="${MEMPROFILE:-$HERE/../memprofile/target/release/memprofile}"
[[ -x "$MEMPROFILE" ]] || die "$MEMPROFILE not built (make -C guest-image memprofile)"
export TIMEOUT="${TIMEOUT:-2400}" IDLE="${IDLE:-150}" MEM_MIB="${MEM_MIB:-1024}"
mkdir -p "$OUTDIR"

pids=() names=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for i in $(seq 1 "$N"); do
    name="prof$i"
    names+=("$name")
    rm -rf "$OUTDIR/$name".*
    KERNEL="$KERNEL" ROOTFS="$ROOTFS" "$HERE/new-instance.sh" "$name" "$name.example.net" "$OUTDIR" >/dev/null
    MEMFILE="$OUTDIR/$name.mem" CAPTURE="$OUTDIR/$name.ram" \
        "$HERE/check-boot.sh" "$KERNEL" "$ROOTFS" "$OUTDIR/$name.data.ext4" "$OUTDIR/$name.run" \
        >"$OUTDIR/$name.log" 2>&1 &
    pids+=($!)
    log "started $name (pid $!; log $OUTDIR/$name.log)"
done
fail=0
for k in "${!pids[@]}"; do
    wait "${pids[$k]}" || { log "${names[$k]} failed:"; tail -n 20 "$OUTDIR/${names[$k]}.log" >&2; fail=1; }
done
pids=()
for name in "${names[@]}"; do
    rm -f "$OUTDIR/$name.mem"
    [[ -f "$OUTDIR/$name.ram" ]] || fail=1
    cat "$OUTDIR/$name.log" >&2
done
[[ $fail == 0 ]] || die "not every instance was captured"
rams=()
for name in "${names[@]}"; do rams+=("$OUTDIR/$name.ram"); done
"$MEMPROFILE" --pack "$OUTDIR/${names[0]}.ksmvmram" "${rams[@]}" | tee "$OUTDIR/report.txt"
"$MEMPROFILE" --json "${rams[@]}" >"$OUTDIR/report.json"
log "report: $OUTDIR/report.txt"
