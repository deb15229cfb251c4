#!/usr/bin/env bash
# Build the shared, read-only Mastodon root filesystem image (ext4).
#
#   build-rootfs.sh OUT.ext4
#
# mmdebstrap (bookworm) -> tarball -> fakeroot + `mke2fs -d`: no loop mounts,
# no root privileges needed for the image itself (mmdebstrap runs in
# unshare mode when started as a normal user with subordinate uids; as root
# it uses its root mode in a temporary directory).
#
# The Mastodon application (MASTODON_VERSION, a git tag) is installed when
# github.com, rubygems.org and registry.npmjs.org are reachable (or
# MASTODON=1); MASTODON=0 skips it. Without it the image still builds, and
# the Mastodon units are skipped at boot (ConditionPathExists).
#
# Environment: MIRROR (default http://deb.debian.org/debian), SUITE
# (bookworm), MASTODON (auto|0|1), MASTODON_VERSION, SOURCE_DATE_EPOCH,
# ROOTFS_UUID, KSMVM_CACHE (apt package cache).
set -euo pipefail
PROG=build-rootfs
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:?usage: build-rootfs.sh OUT.ext4}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
MASTODON="${MASTODON:-auto}"
# Pinned upstream release (git tag of https://github.com/mastodon/mastodon).
MASTODON_VERSION="${MASTODON_VERSION:-v4.3.8}"
# A fixed timestamp and filesystem UUID: rebuilding from the same package
# versions gives the same file contents (what KSM cares about) and metadata.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1735689600}"   # 2025-01-01
ROOTFS_UUID="${ROOTFS_UUID:-4b534d56-6d61-7374-6f64-6f6e2d726f6f}"
CACHE="${KSMVM_CACHE:-${HOME:?}/.cache/ksmvm}"

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
notice() {
    printf '\n%s\n' "==========================================================================" >&2
    printf '%s: NOTICE: %s\n' "$PROG" "$1" >&2
    shift
    [[ $# == 0 ]] || printf '    %s\n' "$@" >&2
    printf '%s\n\n' "==========================================================================" >&2
}

for tool in mmdebstrap mke2fs fakeroot tar; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install mmdebstrap e2fsprogs fakeroot"
done

# --- Can the Mastodon application be installed? --------------------------
reachable() { curl -fsS -m 10 -o /dev/null "$1" 2>/dev/null; }
install_app=0
case "$MASTODON" in
    0) ;;
    1) install_app=1 ;;
    auto)
        missing=""
        git ls-remote --exit-code https://github.com/mastodon/mastodon.git "refs/tags/$MASTODON_VERSION" \
            >/dev/null 2>&1 || missing="$missing github.com"
        reachable https://rubygems.org/api/v1/versions/rails/latest.json || missing="$missing rubygems.org"
        reachable https://registry.npmjs.org/corepack || missing="$missing registry.npmjs.org"
        if [[ -z "$missing" ]]; then
            install_app=1
        else
            notice "cannot reach:$missing" \
                "Building the base image WITHOUT the Mastodon application ($MASTODON_VERSION)." \
                "PostgreSQL, Redis, nginx, Ruby and Node.js are installed; the mastodon-* units" \
                "are present but skipped at boot (ConditionPathExists). Rebuild on a machine" \
                "that reaches GitHub, rubygems.org and npm (or set MASTODON=1) to include it."
        fi ;;
    *) die "MASTODON must be auto, 0 or 1" ;;
esac

# --- Up to date? The image is keyed by the content of its inputs (the
# recipe, the overlay with its modes, the suite and whether the application
# is in it): a second run with the same key does nothing.
key="$( { printf 'suite=%s mirror=%s app=%s version=%s epoch=%s uuid=%s\n' "$SUITE" "$MIRROR" \
        "$install_app" "$MASTODON_VERSION" "$SOURCE_DATE_EPOCH" "$ROOTFS_UUID"
      cd "$HERE" && find packages.txt build-rootfs.sh customize-rootfs.sh finish-rootfs.sh \
          install-mastodon.sh rootfs-overlay -type f -printf '%p %m\n' | LC_ALL=C sort
      cd "$HERE" && find packages.txt build-rootfs.sh customize-rootfs.sh finish-rootfs.sh \
          install-mastodon.sh rootfs-overlay -type f -print0 | LC_ALL=C sort -z | xargs -0 cat
    } | sha256sum | cut -c1-16)"
if [[ -f "$OUT" && "$(cat "$OUT.key" 2>/dev/null)" == "$key" ]]; then
    log "up to date: $OUT (key $key)"
    exit 0
fi
[[ "$MASTODON" != 0 ]] || notice "MASTODON=0: building the base image without the Mastodon application."

packages="$(grep -vE '^\s*(#|$)' "$HERE/packages.txt" | tr '\n' ',' | sed 's/,$//')"
work="$(mktemp -d "${TMPDIR:-/tmp}/ksmvm-rootfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$CACHE/apt-archives"

hooks=(
    --customize-hook="sync-in '$HERE/rootfs-overlay' /"
    --customize-hook="'$HERE/customize-rootfs.sh' \"\$1\""
)
if [[ "$install_app" == 1 ]]; then
    hooks+=(--customize-hook="MASTODON_VERSION='$MASTODON_VERSION' '$HERE/install-mastodon.sh' \"\$1\"")
fi
hooks+=(--customize-hook="'$HERE/finish-rootfs.sh' \"\$1\"")

log "mmdebstrap $SUITE ($(wc -w <<<"${packages//,/ }") packages, app=$install_app) -> $work/rootfs.tar"
start=$(date +%s)
nice -n 19 mmdebstrap \
    --variant=minbase \
    --include="$packages" \
    --aptopt='APT::Install-Recommends "false"' \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --setup-hook="mkdir -p \"\$1/var/cache/apt/archives\"" \
    --setup-hook="sync-in '$CACHE/apt-archives' /var/cache/apt/archives" \
    "${hooks[@]}" \
    --customize-hook="sync-out /var/cache/apt/archives '$CACHE/apt-archives'" \
    "$SUITE" "$work/rootfs.tar" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main" >&2
rm -f "$CACHE/apt-archives/lock"; rm -rf "$CACHE/apt-archives/partial"
mid=$(date +%s)

# --- tarball -> ext4, without root: fakeroot keeps the ownership and device
# nodes from the tarball for mke2fs -d.
log "mke2fs -d (fakeroot)"
fakeroot -- bash -euo pipefail -c '
    work="$1" out="$2" uuid="$3"
    mkdir "$work/root"
    tar -C "$work/root" --numeric-owner -xpf "$work/rootfs.tar"
    rm -f "$work/rootfs.tar"
    kib=$(du -sk --apparent-size "$work/root" | cut -f1)
    # 12% + 96 MiB for ext4 metadata; the root is mounted read-only.
    size_mib=$(( kib * 112 / 100 / 1024 + 96 ))
    rm -f "$out.tmp"
    E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" mke2fs -q -t ext4 -L ksmvm-root -U "$uuid" \
        -E "hash_seed=$uuid,root_owner=0:0" -O ^has_journal -m 0 -i 16384 \
        -d "$work/root" "$out.tmp" "${size_mib}M"
' _ "$work" "$OUT" "$ROOTFS_UUID"
mv "$OUT.tmp" "$OUT"
end=$(date +%s)
echo "app=$install_app version=$MASTODON_VERSION" >"$OUT.info"
echo "$key" >"$OUT.key"
log "done: $OUT ($(du -h --apparent-size "$OUT" | cut -f1) apparent, $(du -h "$OUT" | cut -f1) on disk; mmdebstrap $((mid - start)) s, mke2fs $((end - mid)) s; mastodon app: $([[ $install_app == 1 ]] && echo "$MASTODON_VERSION" || echo absent))"
