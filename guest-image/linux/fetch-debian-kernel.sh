#!/usr/bin/env bash
# Fetch the Debian 12 (bookworm) cloud kernel and extract its ELF vmlinux,
# the boot-protocol test kernel (see /work/shared/MACHINE.md).
#
# Usage: fetch-debian-kernel.sh [--print-path | --force | --help]
#
# Result, in ${KSMVM_CACHE:-$HOME/.cache/ksmvm}/linux/:
#   vmlinux          ELF x86-64 executable (~53 MB), decompressed from vmlinuz
#   vmlinuz          the bzImage from the .deb
#   config           the kernel's .config (/boot/config-*)
#   version          kernel release, e.g. 6.1.0-48-cloud-amd64 (written last:
#                    its presence means the cache is complete)
#   package-version  Debian package version, e.g. 6.1.172-1
#   banner           the kernel's "Linux version ..." line
# The last line of stdout is the absolute path of vmlinux; progress goes to
# stderr. Once cached, nothing touches the network.
#
#   --print-path  print the cached vmlinux path, or fail (exit 1) if it is
#                 not cached; never uses the network
#   --force       fetch again even when cached (e.g. for a newer ABI N)
#
# KSMVM_KERNEL_PKG=linux-image-6.1.0-N-cloud-amd64 pins the package instead
# of taking the one linux-image-cloud-amd64 depends on. Which N that is
# depends on how fresh the host's apt lists are; the cache keeps whatever
# was fetched first until --force.
#
# Needs apt (Debian/Ubuntu host), lz4 (installed automatically as root), flock.
set -euo pipefail

PROG="fetch-debian-kernel"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

mode=fetch
case "${1:-}" in
"") ;;
--print-path) mode=print ;;
--force) mode=force ;;
-h | --help)
    usage
    exit 0
    ;;
*)
    usage >&2
    die "unknown argument: $1"
    ;;
esac
[[ $# -le 1 ]] || die "expected at most one argument"

CACHE="$(cache_dir)"

cached() {
    [[ -s "$CACHE/vmlinux" && -s "$CACHE/vmlinuz" && -s "$CACHE/version" ]]
}

report_cached() {
    log "cached: Linux $(cat "$CACHE/version") in $CACHE"
    printf '%s\n' "$CACHE/vmlinux"
}

if [[ "$mode" == print ]]; then
    cached || die "no cached Debian kernel in $CACHE; run $0 (without --print-path) to fetch it"
    report_cached
    exit 0
fi
if [[ "$mode" == fetch ]] && cached; then
    report_cached
    exit 0
fi

take_lock "$CACHE"
# Another process may have finished the fetch while we waited for the lock.
if [[ "$mode" == fetch ]] && cached; then
    report_cached
    exit 0
fi

# is_x86_64_elf_exec FILE: ELF64, little-endian, ET_EXEC, EM_X86_64.
is_x86_64_elf_exec() {
    local h
    h="$(od -An -tx1 -N20 -- "$1" 2>/dev/null | tr -d ' \n')"
    [[ "$h" == 7f454c460201* && "${h:32:4}" == 0200 && "${h:36:4}" == 3e00 ]]
}

# elf_entry FILE: e_entry as 0x..., read from the header (little-endian).
elf_entry() {
    local b i out=
    read -r -a b <<<"$(od -An -tx1 -j24 -N8 -- "$1")"
    for ((i = 7; i >= 0; i--)); do out+="${b[i]}"; done
    printf '0x%s\n' "$out"
}

need_cmd lz4 lz4
need_cmd dpkg-deb dpkg
need_cmd apt-get apt

# --- which kernel: linux-image-cloud-amd64 depends on linux-image-6.1.0-N-cloud-amd64
find_kernel_pkg() {
    if [[ -n "${KSMVM_KERNEL_PKG:-}" ]]; then
        printf '%s\n' "$KSMVM_KERNEL_PKG"
        return
    fi
    apt-cache "${APT_OPTS[@]}" depends linux-image-cloud-amd64 2>/dev/null |
        grep -o 'linux-image-6\.1\.0-[0-9]*-cloud-amd64' | head -n1 || true
}
if [[ -n "${KSMVM_APT_PRIVATE:-}" ]]; then apt_use_private; fi
pkg="$(find_kernel_pkg)"
if [[ -z "$pkg" ]] && ! apt_knows linux-image-cloud-amd64 && apt_system_update; then
    pkg="$(find_kernel_pkg)"
fi
if [[ -z "$pkg" ]]; then
    # Not root with empty lists, no Debian bookworm sources, or another
    # release (whose linux-image-cloud-amd64 is not 6.1): use bookworm directly.
    apt_use_private
    pkg="$(find_kernel_pkg)"
fi
[[ -n "$pkg" ]] || die "apt-cache depends linux-image-cloud-amd64 names no linux-image-6.1.0-N-cloud-amd64"
log "kernel package: $pkg"

tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
trap 'rm -rf -- "$tmp"' EXIT

if ! deb="$(apt_download "$pkg" "$tmp")"; then
    # Stale package lists name a version the archive no longer has: refresh
    # them (system lists as root, else the private ones) and resolve again.
    if [[ -z "$APT_PRIVATE" ]] && apt_system_update; then
        :
    else
        apt_use_private
    fi
    pkg="$(find_kernel_pkg)"
    [[ -n "$pkg" ]] || die "after updating the package lists, linux-image-cloud-amd64 names no 6.1.0-N kernel"
    log "kernel package after update: $pkg"
    deb="$(apt_download "$pkg" "$tmp")" || die "could not download $pkg"
fi
pkgver="$(dpkg-deb -f "$deb" Version)"
log "got $(basename -- "$deb") ($(du -h -- "$deb" | cut -f1)); extracting /boot"

# Only /boot is needed; the rest of the package is modules.
mkdir "$tmp/root"
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp/root" --wildcards './boot/*'
vmlinuz="$(find "$tmp/root/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)"
[[ -n "$vmlinuz" ]] || die "$deb has no /boot/vmlinuz-*"
release="${vmlinuz##*/vmlinuz-}"

# --- decompress the bzImage payload: LZ4 legacy frame (magic 02 21 4c 18),
# as the kernel's scripts/extract-vmlinux does. The frame is followed by
# other data, so lz4 may complain (and exit non-zero) after writing the
# complete output: judge the output, not the exit status.
mapfile -t offsets < <(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' -- "$vmlinuz" | cut -d: -f1)
[[ ${#offsets[@]} -gt 0 ]] ||
    die "no LZ4 legacy frame (02 21 4c 18) in $vmlinuz; is it still LZ4-compressed?"
vmlinux="$tmp/vmlinux"
found=
for off in "${offsets[@]}"; do
    tail -c "+$((off + 1))" -- "$vmlinuz" | lz4 -dc >"$vmlinux" 2>"$tmp/lz4.err" || true
    if is_x86_64_elf_exec "$vmlinux"; then
        found="$off"
        break
    fi
done
[[ -n "$found" ]] || die "no LZ4 frame in $vmlinuz decompresses to an x86-64 ELF executable (lz4: $(tail -n1 "$tmp/lz4.err" 2>/dev/null))"
size="$(stat -c %s -- "$vmlinux")"
((size > 20 * 1024 * 1024)) ||
    die "decompressed vmlinux is only $size bytes (expected ~53 MB); the LZ4 frame was cut short"
if command -v readelf >/dev/null 2>&1; then
    readelf -h -- "$vmlinux" | grep -q 'Type:[[:space:]]*EXEC' || die "readelf: vmlinux is not an executable"
fi
# vmlinux holds two banners: a weak placeholder ("... # SMP ...") and the
# one the kernel prints ("... #1 SMP ..."); keep the latter.
banner="$(LC_ALL=C grep -a -o 'Linux version [0-9][[:print:]]*' -- "$vmlinux" |
    awk '/ #[0-9]/ { b = $0; f = 1 } !f { b = $0 } END { print b }' || true)"
log "vmlinux: payload at offset $found, $size bytes, entry $(elf_entry "$vmlinux")"

# --- install: atomic renames inside the cache dir, 'version' last.
mv -f -- "$vmlinuz" "$CACHE/vmlinuz"
mv -f -- "$vmlinux" "$CACHE/vmlinux"
# (Debian's /boot/System.map-* is a placeholder; the real one is in -dbg.)
if [[ -e "$tmp/root/boot/config-$release" ]]; then mv -f -- "$tmp/root/boot/config-$release" "$CACHE/config"; fi
printf '%s\n' "$pkgver" >"$tmp/package-version" && mv -f -- "$tmp/package-version" "$CACHE/package-version"
printf '%s\n' "$banner" >"$tmp/banner" && mv -f -- "$tmp/banner" "$CACHE/banner"
printf '%s\n' "$release" >"$tmp/version" && mv -f -- "$tmp/version" "$CACHE/version"

log "installed Linux $release (Debian $pkgver) in $CACHE"
printf '%s\n' "$CACHE/vmlinux"
