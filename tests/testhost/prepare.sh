#!/usr/bin/env bash
# Prepare the test host: a Linux guest of QEMU's software emulation (TCG) of
# an AMD CPU with SVM, whose kvm_amd gives a real hardware-virtualisation KVM
# (see tests/testhost/README.md and ../shared/MACHINE.md).
#
# Usage: prepare.sh [--help]
#
# Everything comes from Debian packages and is cached outside the repo, in
#   ${KSMVM_CACHE:-$HOME/.cache/ksmvm}/testhost/<kernel package version>/
#     vmlinuz        Debian's standard kernel (bzImage): the test host's
#                    kernel, and a guest kernel for the boot-protocol tests
#     vmlinux        the same kernel as an ELF file (decompressed payload)
#     initrd.cpio.gz the test host's initramfs: busybox-static, the modules
#                    below and tests/testhost/init.sh as /init
#     config, version, package-version
# The last line of stdout is that directory. Once cached, only the
# initramfs is rebuilt (when init.sh or the module list changes).
#
# KSMVM_TESTHOST_KERNEL_PKG pins the kernel package (default: the one
# linux-image-amd64 depends on).
set -euo pipefail
PROG=testhost-prepare
HERE="$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../../guest-image/linux/common.sh
source "$HERE/../../guest-image/linux/common.sh"

only_help_flag "$@"

# Modules the test host loads, in dependency order (Debian 6.1 standard
# kernel): KVM for AMD, virtio-pci and 9p for the shared folders, tun for
# the network tests.
MODULES=(irqbypass kvm ccp kvm-amd virtio_ring virtio virtio_pci_modern_dev
    virtio_pci_legacy_dev virtio_pci 9pnet 9pnet_virtio netfs fscache 9p tun)

need_cmd cpio cpio
need_cmd gzip gzip
need_cmd xz xz-utils
need_cmd dpkg-deb dpkg
need_cmd python3 python3

BASE="${KSMVM_CACHE:-${HOME:?HOME is not set; set KSMVM_CACHE}/.cache/ksmvm}/testhost"
mkdir -p "$BASE"
take_lock "$BASE"

pkg="${KSMVM_TESTHOST_KERNEL_PKG:-}"
if [[ -z "$pkg" ]]; then
    if [[ -s "$BASE/current/version" ]]; then
        pkg="linux-image-$(cat "$BASE/current/version")"
    else
        apt_knows linux-image-amd64 || apt_system_update || true
        apt_knows linux-image-amd64 || apt_use_private
        pkg="$(apt-cache "${APT_OPTS[@]}" depends linux-image-amd64 2>/dev/null |
            awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
        [[ -n "$pkg" ]] || die "apt-cache depends linux-image-amd64 names no kernel package"
    fi
fi
OUT="$BASE/${pkg#linux-image-}"

tmp="$(mktemp -d "$BASE/.prepare.XXXXXX")"
trap 'rm -rf -- "$tmp"' EXIT

if [[ ! -s "$OUT/version" ]]; then
    apt_knows "$pkg" || apt_system_update || true
    apt_knows "$pkg" || apt_use_private
    deb="$(apt_download "$pkg" "$tmp")" || die "could not download $pkg"
    dpkg-deb -x "$deb" "$tmp/x"
    rel="${pkg#linux-image-}"
    mkdir -p "$tmp/out/modules"
    cp -- "$tmp/x/boot/vmlinuz-$rel" "$tmp/out/vmlinuz"
    cp -- "$tmp/x/boot/config-$rel" "$tmp/out/config"
    for m in "${MODULES[@]}"; do
        f="$(find "$tmp/x/lib/modules/$rel" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)"
        [[ -n "$f" ]] || die "$pkg has no module $m"
        case "$f" in
        *.xz) xz -dc -- "$f" >"$tmp/out/modules/$m.ko" ;;
        *) cp -- "$f" "$tmp/out/modules/$m.ko" ;;
        esac
    done
    # The ELF vmlinux: the payload after the first XZ stream magic.
    python3 - "$tmp/out/vmlinuz" "$tmp/payload.xz" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
off = data.find(b"\xfd7zXZ\x00")
if off < 0:
    sys.exit("no XZ payload in " + sys.argv[1])
open(sys.argv[2], "wb").write(data[off:])
PY
    xz -dc --single-stream -- "$tmp/payload.xz" >"$tmp/out/vmlinux" 2>/dev/null || true
    [[ "$(od -An -tx1 -N4 -- "$tmp/out/vmlinux" | tr -d ' ')" == 7f454c46 ]] ||
        die "the decompressed payload of $pkg is not an ELF file"
    dpkg-deb -f "$deb" Version >"$tmp/out/package-version"
    echo "$rel" >"$tmp/out/version"
    rm -rf -- "$OUT"
    mv -- "$tmp/out" "$OUT"
    log "cached $pkg ($(cat "$OUT/package-version")) in $OUT"
fi

# busybox-static, shared with guest-image/linux/make-initramfs.sh's cache.
BUSYBOX="$(cache_dir)/busybox-static"
if [[ ! -x "$BUSYBOX" ]]; then
    bash "$HERE/../../guest-image/linux/make-initramfs.sh" >/dev/null
fi
[[ -x "$BUSYBOX" ]] || die "no busybox-static in $BUSYBOX"

root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,host,scratch,modules}
cp -- "$BUSYBOX" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp -- "$HERE/init.sh" "$root/init"
chmod 0755 "$root/init" "$root/bin/busybox"
for m in "${MODULES[@]}"; do cp -- "$OUT/modules/$m.ko" "$root/modules/"; done
printf '%s\n' "${MODULES[@]}" >"$root/modules/order"
pack_initramfs "$root" "$OUT/initrd.cpio.gz"
ln -sfn "$(basename -- "$OUT")" "$BASE/current.tmp" && mv -T "$BASE/current.tmp" "$BASE/current"
printf '%s\n' "$OUT"
