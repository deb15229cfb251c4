#!/usr/bin/env bash
# Build the initramfs of the real-Linux test lane (tests/real_linux.rs): a
# busybox system whose init a test drives over the serial console.
#
# Usage: make-test-initramfs.sh [--help]
#
# PID 1 is busybox init (/init -> busybox) with this /etc/inittab:
#   sysinit     /etc/rc: mounts /proc, /sys, /dev, /dev/shm, /tmp, quiets
#               kernel messages on the console (dmesg -n 1), prints
#                 KSMVM-T boot nproc=N online=LIST memtotal_kb=N
#                 KSMVM-T cmdline <the kernel command line>
#   once        /etc/loop: prints "KSMVM-T ready", then reads lines from
#               the console, runs each with eval and answers "KSMVM-T rc=N".
#   ctrlaltdel  poweroff: a graceful stop. The VMM's Ctrl-Alt-Del (SIGTERM)
#               reaches init as SIGINT through the i8042 keyboard.
#   shutdown    /etc/rc.shutdown: prints "KSMVM-T shutdown", syncs,
#               remounts read-only; then init powers the machine off.
#   restart     /bin/false: `kill -QUIT 1` makes init exec it as PID 1, it
#               exits, and the kernel panics ("Attempted to kill init").
#
# Output: ${KSMVM_CACHE:-$HOME/.cache/ksmvm}/linux/test-initramfs.cpio.gz;
# the last line of stdout is its path. Rebuilt on every run (milliseconds),
# replaced only when its content changes.
set -euo pipefail

PROG="make-test-initramfs"
HERE="$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"

only_help_flag "$@"

need_cmd cpio cpio
need_cmd gzip gzip
CACHE="$(cache_dir)"
BUSYBOX="$CACHE/busybox-static"
# make-initramfs.sh downloads and checks busybox-static into the cache.
[[ -x "$BUSYBOX" ]] || bash "$HERE/make-initramfs.sh" >/dev/null
OUT="$CACHE/test-initramfs.cpio.gz"

take_lock "$CACHE"
tmp="$(mktemp -d "$CACHE/.test-initramfs.XXXXXX")"
trap 'rm -rf -- "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,root,mnt}
cp -- "$BUSYBOX" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
ln -s bin/busybox "$root/init"
for a in $("$BUSYBOX" --list); do
    [[ "$a" == busybox ]] || ln -sf busybox "$root/bin/$a"
done

cat >"$root/etc/inittab" <<'INITTAB'
::sysinit:/etc/rc
::once:/etc/loop
::ctrlaltdel:/bin/poweroff
::shutdown:/etc/rc.shutdown
::restart:/bin/false
INITTAB

cat >"$root/etc/rc" <<'RC'
#!/bin/sh
# ksmvm real-Linux test initramfs (guest-image/linux/make-test-initramfs.sh)
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777,size=80% tmpfs /dev/shm
mount -t tmpfs -o mode=1777,size=80% tmpfs /tmp
dmesg -n 1
echo "KSMVM-T boot nproc=$(grep -c ^processor /proc/cpuinfo) online=$(cat /sys/devices/system/cpu/online) memtotal_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
echo "KSMVM-T cmdline $(cat /proc/cmdline)"
RC

# A `once` action, not part of sysinit: init handles its signals (poweroff,
# Ctrl-Alt-Del) only after every sysinit action has ended.
cat >"$root/etc/loop" <<'LOOP'
#!/bin/sh
export PATH=/bin
# init gives each action a freshly set-up console: no echo of our input.
stty -echo 2>/dev/null
echo "KSMVM-T ready"
while read -r line; do
    eval "$line"
    echo "KSMVM-T rc=$?"
done
LOOP

cat >"$root/etc/rc.shutdown" <<'SHUT'
#!/bin/sh
echo "KSMVM-T shutdown"
sync
mount -o remount,ro / 2>/dev/null
SHUT
chmod 0755 "$root/etc/rc" "$root/etc/loop" "$root/etc/rc.shutdown"
pack_initramfs "$root" "$OUT"
printf '%s\n' "$OUT"
