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
# Folded into another module in newer kernels (fscache into netfs in 6.12,
# bookworm-backports): absent there, and not needed.
OPTIONAL_MODULES=" fscache "

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
    # A module built into a newer kernel (modules.builtin) is skipped; the
    # ones to load are listed in modules/order.
    for m in "${MODULES[@]}"; do
        f="$(find "$tmp/x/lib/modules/$rel" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)"
        if [[ -z "$f" ]]; then
            if grep -qE "/${m//[-_]/[-_]}\.ko\$" "$tmp/x/lib/modules/$rel/modules.builtin" 2>/dev/null; then
                log "$m is built into $pkg"
            elif [[ "$OPTIONAL_MODULES" == *" $m "* ]]; then
                log "$pkg has no module $m (not needed there)"
            else
                die "$pkg has no module $m"
            fi
            continue
        fi
        case "$f" in
        *.xz) xz -dc -- "$f" >"$tmp/out/modules/$m.ko" ;;
        *) cp -- "$f" "$tmp/out/modules/$m.ko" ;;
        esac
    done
    # Load order from each module's own `depends=` (its .modinfo; the
    # package has no modules.dep): 6.12's 9pnet needs netfs, 6.1's does not.
    python3 - "$tmp/out/modules" >"$tmp/out/modules/order" <<'PY' ||
import os, re, sys
have_dir = sys.argv[1]
have = sorted(f[:-3] for f in os.listdir(have_dir) if f.endswith(".ko"))
norm = lambda m: m.replace("-", "_")
by_norm = {norm(m): m for m in have}
deps = {}
for m in have:
    data = open(os.path.join(have_dir, m + ".ko"), "rb").read()
    found = re.search(rb"(?:^|\x00)depends=([^\x00]*)", data)
    deps[norm(m)] = [norm(d) for d in found.group(1).decode().split(",") if d] if found else []
order, seen = [], set()
def visit(n):
    if n in seen:
        return
    seen.add(n)
    for d in deps[n]:
        if d not in by_norm:
            sys.exit(f"module {by_norm[n]} needs {d}, which is not in MODULES")
        visit(d)
    order.append(by_norm[n])
for n in sorted(by_norm):
    visit(n)
print("\n".join(order))
PY
        die "cannot order the modules of $pkg"
    # The ELF vmlinux: the compressed payload after its stream magic (XZ in
    # Debian's 6.1 kernels, zstd in 6.12).
    codec="$(python3 - "$tmp/out/vmlinuz" "$tmp/payload" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
for name, magic in (("xz", b"\xfd7zXZ\x00"), ("zstd", b"\x28\xb5\x2f\xfd")):
    off = data.find(magic)
    if off >= 0:
        open(sys.argv[2], "wb").write(data[off:])
        print(name)
        break
else:
    sys.exit("no XZ or zstd payload in " + sys.argv[1])
PY
)"
    case "$codec" in
    xz) xz -dc --single-stream -- "$tmp/payload" >"$tmp/out/vmlinux" 2>/dev/null || true ;;
    zstd)
        need_cmd zstd zstd
        # Trailing bytes after the frame make zstd complain; the frame is whole.
        zstd -dcq -- "$tmp/payload" >"$tmp/out/vmlinux" 2>/dev/null || true ;;
    esac
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
# Caches made before modules/order existed hold every module of MODULES.
[[ -f "$OUT/modules/order" ]] || printf '%s\n' "${MODULES[@]}" >"$OUT/modules/order"
while read -r m; do cp -- "$OUT/modules/$m.ko" "$root/modules/"; done <"$OUT/modules/order"
cp -- "$OUT/modules/order" "$root/modules/order"
pack_initramfs "$root" "$OUT/initrd.cpio.gz"
ln -sfn "$(basename -- "$OUT")" "$BASE/current.tmp" && mv -T "$BASE/current.tmp" "$BASE/current"
printf '%s\n' "$OUT"
