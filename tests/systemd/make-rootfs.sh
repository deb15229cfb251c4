#!/bin/sh
# Builds (once) the minimal Debian root file system the systemd integration
# test boots a real systemd in: minbase + systemd, systemd-sysv and dbus.
# It is cached outside the repo and only ever used read-only (the test puts
# an overlay on top), so several test runs can share it.
#
#   tests/systemd/make-rootfs.sh          # prints the rootfs path
#   KSMVM_CACHE=/somewhere tests/systemd/make-rootfs.sh
set -eu

cache="${KSMVM_CACHE:-$HOME/.cache/ksmvm}"
root="$cache/systemd-rootfs"

if [ -e "$root/.ksmvm-rootfs-complete" ]; then
    echo "$root"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "make-rootfs.sh: debootstrap needs root" >&2
    exit 1
fi

# Two test runs may want the rootfs at once: one builds, the other waits.
mkdir -p "$cache"
exec 9>"$cache/.systemd-rootfs.lock"
flock 9
if [ -e "$root/.ksmvm-rootfs-complete" ]; then
    echo "$root"
    exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    echo "make-rootfs.sh: installing debootstrap" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

# The ksmvm binary is bound in from the host, dynamically linked: the rootfs
# must have the host's glibc, so use the host's Debian release and mirror.
suite="${KSMVM_ROOTFS_SUITE:-}"
if [ -z "$suite" ] && [ -r /etc/os-release ]; then
    suite="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
fi
suite="${suite:-bookworm}"
mirror="${KSMVM_ROOTFS_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror="$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\/debian\)$/\1/p' \
        /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)"
fi
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
    mirror="$(awk '$1 == "deb" && $3 !~ /security/ { print $2; exit }' /etc/apt/sources.list)"
fi

tmp="$root.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
echo "make-rootfs.sh: debootstrap $suite into $root (about a minute)" >&2
# shellcheck disable=SC2086 # $mirror is empty (debootstrap's default) or one word
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus \
    "$suite" "$tmp" $mirror >"$cache/debootstrap.log" 2>&1 || {
    tail -n 30 "$cache/debootstrap.log" >&2
    exit 1
}

# A container needs no consoles, no network setup and no periodic jobs;
# masking them keeps boot short and quiet.
for unit in getty.target console-getty.service systemd-networkd.service \
    systemd-resolved.service systemd-timesyncd.service apt-daily.timer \
    apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    fstrim.timer systemd-tmpfiles-clean.timer; do
    ln -sf /dev/null "$tmp/etc/systemd/system/$unit"
done
ln -sf /lib/systemd/system/multi-user.target "$tmp/etc/systemd/system/default.target"
# Empty: systemd makes a transient machine id for each boot.
: >"$tmp/etc/machine-id"
mkdir -p "$tmp/etc/ksmvm" "$tmp/var/lib/ksmvm"
touch "$tmp/.ksmvm-rootfs-complete"

rm -rf "$root"
mv "$tmp" "$root"
trap - EXIT
echo "$root"
