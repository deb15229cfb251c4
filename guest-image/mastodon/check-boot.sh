#!/usr/bin/env bash
# Boot the Mastodon guest under QEMU's software emulation (TCG) with the
# virtio-mmio device model ksmvm uses, and wait for the console marker
# printed by ksmvm-ready.service once multi-user.target is reached:
#   KSMVM-READY ok postgresql@15-main=active redis-server=active nginx=active ...
#
#   check-boot.sh KERNEL ROOTFS DATA RUNDIR
#
# RUNDIR receives console.log (the serial console) and qemu.log.
# Exit status: 0 when the marker says ok, 1 otherwise (fail marker, QEMU
# died, timeout). QEMU is always killed on exit.
#
# Environment:
#   TIMEOUT     seconds to wait for the marker (default 1800)
#   MEM_MIB     guest RAM (default 1024)
#   MEMFILE     back guest RAM with this file (memory-backend-file, share=on)
#   CAPTURE     after the marker, let the guest idle IDLE seconds (default
#               150), pause it and copy its RAM (MEMFILE) to this path
#   APPEND      extra kernel command line words
#   QEMU        (default qemu-system-x86_64)
set -euo pipefail
PROG=check-boot
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

[[ $# == 4 ]] || die "usage: check-boot.sh KERNEL ROOTFS DATA RUNDIR"
KERNEL="$1" ROOTFS="$2" DATA="$3" RUNDIR="$4"
TIMEOUT="${TIMEOUT:-1800}"
MEM_MIB="${MEM_MIB:-1024}"
IDLE="${IDLE:-150}"
QEMU="${QEMU:-qemu-system-x86_64}"
for f in "$KERNEL" "$ROOTFS" "$DATA"; do [[ -f "$f" ]] || die "$f not found"; done
command -v "$QEMU" >/dev/null || die "$QEMU not found (apt-get install qemu-system-x86)"
[[ -z "${CAPTURE:-}" || -n "${MEMFILE:-}" ]] || die "CAPTURE needs MEMFILE"
mkdir -p "$RUNDIR"
CONSOLE="$RUNDIR/console.log"
QMP="$RUNDIR/qmp.sock"
rm -f "$CONSOLE" "$QMP"

# Identity from the data disk's instance.env (machine id, hostname).
env_of() { debugfs -R "cat /ksmvm/instance.env" "$DATA" 2>/dev/null | sed -n "s/^$1=//p" | tr -d '"'; }
name="$(env_of NAME)"; machine_id="$(env_of MACHINE_ID)"; mac="$(env_of MAC)"
cmdline="console=ttyS0 root=/dev/vda ro rootfstype=ext4 panic=-1 reboot=k init_on_free=1"
[[ -n "$machine_id" ]] && cmdline+=" systemd.machine_id=$machine_id"
[[ -n "$name" ]] && cmdline+=" systemd.hostname=$name"
# QEMU's user network: DHCP from 10.0.2.2, DNS at 10.0.2.3.
cmdline+=" ksmvm.dns=10.0.2.3 ${APPEND:-}"

mem=(-m "$MEM_MIB")
if [[ -n "${MEMFILE:-}" ]]; then
    rm -f "$MEMFILE"
    mem=(-m "$MEM_MIB" -object "memory-backend-file,id=mem,size=${MEM_MIB}M,mem-path=$MEMFILE,share=on"
         -machine memory-backend=mem)
fi

# -M microvm, no ACPI: virtio-mmio transports, which QEMU announces on the
# kernel command line (virtio_mmio.device=...) like ksmvm does; the root disk
# is the first transport, so it is /dev/vda.
# shellcheck disable=SC2054  # commas inside QEMU option values
qemu_cmd=("$QEMU" -M microvm,acpi=off,rtc=on,pit=on,pic=on,isa-serial=on
    -accel tcg -cpu max -smp 1 "${mem[@]}"
    -nodefaults -no-user-config -display none -monitor none
    -serial "file:$CONSOLE" -qmp "unix:$QMP,server=on,wait=off"
    -kernel "$KERNEL" -append "$cmdline"
    -drive "id=root,file=$ROOTFS,format=raw,if=none,readonly=on" -device virtio-blk-device,drive=root
    -drive "id=data,file=$DATA,format=raw,if=none,cache=unsafe" -device virtio-blk-device,drive=data
    -netdev user,id=net0 -device "virtio-net-device,netdev=net0${mac:+,mac=$mac}"
    -device virtio-balloon-device,free-page-reporting=on
    -device virtio-rng-device)
printf '%q ' "${qemu_cmd[@]}" >"$RUNDIR/qemu.cmd"; echo >>"$RUNDIR/qemu.cmd"

qpid=""
cleanup() {
    if [[ -n "$qpid" ]] && kill -0 "$qpid" 2>/dev/null; then
        kill "$qpid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$qpid" 2>/dev/null || true
        wait "$qpid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

qmp() {  # qmp COMMAND: run one QMP command, print the reply
    python3 - "$QMP" "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(60); s.connect(sys.argv[1])
f = s.makefile("rw")
json.loads(f.readline())
for cmd in ("qmp_capabilities", sys.argv[2]):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "event" not in r: break
print(json.dumps(r))
PY
}

log "booting $(basename "$KERNEL") + $(basename "$ROOTFS") + $(basename "$DATA") under TCG (timeout ${TIMEOUT}s); console: $CONSOLE"
start=$(date +%s)
nice -n "${NICE:-10}" "${qemu_cmd[@]}" >"$RUNDIR/qemu.log" 2>&1 &
qpid=$!

marker=""
while :; do
    if marker="$(grep -a -o -m1 'KSMVM-READY .*' "$CONSOLE" 2>/dev/null)"; then break; fi
    if ! kill -0 "$qpid" 2>/dev/null; then
        wait "$qpid" || true; qpid=""
        tail -n 40 "$CONSOLE" >&2 || true; cat "$RUNDIR/qemu.log" >&2
        die "QEMU exited before the guest reported ready"
    fi
    if (( $(date +%s) - start > TIMEOUT )); then
        tail -n 40 "$CONSOLE" >&2 || true
        die "no KSMVM-READY marker after ${TIMEOUT}s"
    fi
    sleep 2
done
ready_s=$(( $(date +%s) - start ))
marker="$(tr -d '\r' <<<"$marker")"
log "after ${ready_s}s: $marker"
grep -a -o 'KSMVM-FAILED .*' "$CONSOLE" | tr -d '\r' >&2 || true
echo "$marker" >"$RUNDIR/marker"
echo "$ready_s" >"$RUNDIR/ready_seconds"

if [[ -n "${CAPTURE:-}" ]]; then
    log "idling ${IDLE}s before capturing guest RAM"
    sleep "$IDLE"
    kill -0 "$qpid" 2>/dev/null || die "QEMU exited while idling"
    qmp stop >/dev/null
    cp --sparse=always "$MEMFILE" "$CAPTURE.tmp"
    mv "$CAPTURE.tmp" "$CAPTURE"
    {
        echo "kernel=$KERNEL"; echo "rootfs=$ROOTFS"; echo "data=$DATA"
        echo "mem_mib=$MEM_MIB"; echo "cmdline=$cmdline"
        echo "ready_after_s=$ready_s"; echo "idle_after_ready_s=$IDLE"
        echo "marker=$marker"
    } >"$CAPTURE.meta"
    log "captured $CAPTURE ($(du -h "$CAPTURE" | cut -f1) allocated)"
    qmp quit >/dev/null || true
fi
[[ "$marker" == "KSMVM-READY ok"* ]]
