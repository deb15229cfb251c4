#!/usr/bin/env bash
# Build the ksmvm guest kernel from Debian's linux-source-6.1 package:
#   make tinyconfig (x86_64) + guest-image/kernel/ksmvm.config
#
# The result is cached outside the repository, keyed by the config fragment,
# the kernel source version and RECIPE (below):
#   ${KSMVM_CACHE:-$HOME/.cache/ksmvm}/kernel/<key>/{vmlinux,bzImage,config}
# A second run with the same key does nothing. stdout: the cache directory.
#
# Environment: KSMVM_CACHE, JOBS (default 2), NICE (default 19),
#              LINUX_SOURCE_TARBALL (default /usr/src/linux-source-6.1.tar.xz)
set -euo pipefail
PROG=build-kernel
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FRAGMENT="$HERE/ksmvm.config"
TARBALL="${LINUX_SOURCE_TARBALL:-/usr/src/linux-source-6.1.tar.xz}"
JOBS="${JOBS:-2}"
NICE="${NICE:-19}"
CACHE="${KSMVM_CACHE:-${HOME:?}/.cache/ksmvm}"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

if [[ ! -f "$TARBALL" ]]; then
    die "$TARBALL not found; install it with: apt-get install linux-source-6.1 bc bison flex libelf-dev libssl-dev"
fi
for tool in make gcc bc bison flex xz sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install build-essential bc bison flex xz-utils)"
done

# Source version: the Debian package version if known, else the tarball's hash.
SRC_VERSION="$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || true)"
[[ -n "$SRC_VERSION" ]] || SRC_VERSION="sha256:$(sha256sum "$TARBALL" | cut -c1-16)"
# Bump RECIPE when the way the kernel is built changes (not for comments).
RECIPE=1
KEY="$( { printf 'recipe=%s base=tinyconfig arch=x86_64 src=%s\n' "$RECIPE" "$SRC_VERSION"; cat "$FRAGMENT"; } | sha256sum | cut -c1-16)"
OUT="$CACHE/kernel/$KEY"

# $CACHE/kernel/current -> the build for the current fragment (for tools
# that want a stable path, e.g. the instance configs).
point_current() { ln -sfn "$KEY" "$CACHE/kernel/current.tmp" && mv -T "$CACHE/kernel/current.tmp" "$CACHE/kernel/current"; }

if [[ -f "$OUT/vmlinux" && -f "$OUT/bzImage" ]]; then
    log "cached: $OUT (linux-source $SRC_VERSION)"
    point_current
    echo "$OUT"
    exit 0
fi

mkdir -p "$CACHE/kernel"
exec {lockfd}>>"$CACHE/kernel/.lock"
flock "$lockfd"
if [[ -f "$OUT/vmlinux" && -f "$OUT/bzImage" ]]; then
    point_current; echo "$OUT"; exit 0
fi

SRC="$CACHE/kernel/src-$SRC_VERSION"
if [[ ! -f "$SRC/.unpacked" ]]; then
    log "unpacking $TARBALL into $SRC"
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    nice -n "$NICE" tar -xf "$TARBALL" -C "$SRC.tmp" --strip-components=1
    touch "$SRC.tmp/.unpacked"
    mv "$SRC.tmp" "$SRC"
fi

BUILD="$OUT.build"
mkdir -p "$BUILD"
MAKE=(nice -n "$NICE" make -C "$SRC" O="$BUILD" ARCH=x86_64 -j"$JOBS")
log "configuring (tinyconfig + $(basename "$FRAGMENT")) in $BUILD"
"${MAKE[@]}" -s tinyconfig >&2
(cd "$BUILD" && "$SRC/scripts/kconfig/merge_config.sh" -m -O "$BUILD" "$BUILD/.config" "$FRAGMENT" >&2)
"${MAKE[@]}" -s olddefconfig >&2

# Every option the fragment names must have the value it asks for.
bad=0
while IFS= read -r line; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        opt="${BASH_REMATCH[1]}" want="${BASH_REMATCH[2]}"
        got="$(grep -E "^$opt=" "$BUILD/.config" | cut -d= -f2- || true)"
        [[ "$got" == "$want" ]] || { log "fragment wants $opt=$want, .config has '${got:-not set}'"; bad=1; }
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set ]]; then
        opt="${BASH_REMATCH[1]}"
        if grep -qE "^$opt=" "$BUILD/.config"; then
            log "fragment wants $opt unset, .config has $(grep -E "^$opt=" "$BUILD/.config")"; bad=1
        fi
    fi
done <"$FRAGMENT"
[[ "$bad" == 0 ]] || die "config fragment did not apply cleanly (see above); fix $FRAGMENT"

[[ "${CONFIG_ONLY:-0}" == 1 ]] && { log "config only: $BUILD/.config"; exit 0; }
log "building vmlinux and bzImage with -j$JOBS (nice $NICE); this takes a while"
start=$(date +%s)
"${MAKE[@]}" vmlinux bzImage >"$BUILD/build.log" 2>&1 || { tail -30 "$BUILD/build.log" >&2; die "kernel build failed; log: $BUILD/build.log"; }
end=$(date +%s)

mkdir -p "$OUT.tmp"
cp "$BUILD/vmlinux" "$OUT.tmp/vmlinux"
cp "$BUILD/arch/x86/boot/bzImage" "$OUT.tmp/bzImage"
cp "$BUILD/.config" "$OUT.tmp/config"
cp "$FRAGMENT" "$OUT.tmp/ksmvm.config"
{
    echo "linux-source-6.1 $SRC_VERSION"
    echo "kernelrelease $("${MAKE[@]}" -s kernelrelease 2>/dev/null)"
    echo "build_seconds $((end - start)) jobs $JOBS nice $NICE"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cpus"
} >"$OUT.tmp/BUILD-INFO"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
point_current
log "done in $((end - start)) s: $OUT"
[[ "${KEEP_KERNEL_BUILD:-0}" == 1 ]] || rm -rf "$BUILD"
echo "$OUT"
