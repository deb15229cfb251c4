# shellcheck shell=bash
# Shared helpers for guest-image/linux/*.sh. Sourced, never executed.
#
# Everything is cached outside the repository in
#   ${KSMVM_CACHE:-$HOME/.cache/ksmvm}/linux/
# and every change to that directory happens under an flock on .lock there,
# so two test processes can run these scripts at the same time.
#
# Progress messages go to stderr; stdout carries only the result path, so
# callers can take the last line of stdout.

# The Debian release whose cloud kernel the tests use (6.1 LTS).
KSMVM_DEBIAN_SUITE="${KSMVM_DEBIAN_SUITE:-bookworm}"
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

# only_help_flag "$@": -h/--help prints the calling script's header comment
# (line 2 up to `set -euo`); no other argument is accepted.
only_help_flag() {
    case "${1:-}" in
    "") ;;
    -h | --help)
        sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
        exit 0
        ;;
    *) die "unknown argument: $1 (see --help)" ;;
    esac
}

# pack_initramfs ROOT OUT: a reproducible newc cpio of the tree ROOT
# (fixed timestamps, owner 0:0, sorted), gzip-compressed, moved to OUT only
# when its content differs from what OUT holds.
pack_initramfs() {
    local root="$1" out="$2" new="$1.cpio.gz"
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >"$new"
    if [[ -f "$out" ]] && cmp -s "$new" "$out"; then
        rm -f -- "$new"
        log "unchanged: $out"
    else
        mv -f -- "$new" "$out"
        log "built $out ($(stat -c %s -- "$out") bytes)"
    fi
}

is_root() { [[ "$(id -u)" == 0 ]]; }

# Absolute path of the cache directory; does not create it.
cache_dir() {
    local base="${KSMVM_CACHE:-${HOME:?HOME is not set; set KSMVM_CACHE}/.cache/ksmvm}"
    realpath -m -- "$base/linux"
}

# take_lock DIR: create DIR and hold an exclusive flock on DIR/.lock until
# the script exits (the fd stays open; the kernel drops the lock on exit).
take_lock() {
    local dir="$1"
    mkdir -p -- "$dir"
    exec {KSMVM_LOCK_FD}>>"$dir/.lock"
    if ! flock -n "$KSMVM_LOCK_FD"; then
        log "another process holds $dir/.lock; waiting for it"
        flock -w "${KSMVM_LOCK_TIMEOUT:-900}" "$KSMVM_LOCK_FD" ||
            die "timed out after ${KSMVM_LOCK_TIMEOUT:-900}s waiting for $dir/.lock"
    fi
}

# ---------------------------------------------------------------------------
# apt. APT_OPTS is empty while the system's apt configuration is used; it is
# switched to a private configuration (lists under the cache directory, Debian
# $KSMVM_DEBIAN_SUITE sources) when the system's apt cannot provide what we
# need: no Debian $KSMVM_DEBIAN_SUITE sources, a different release, or not
# root and the package lists are empty.
APT_OPTS=()
APT_UPDATED=
APT_PRIVATE=

# Download as root without the "_apt cannot access" sandbox warning.
apt_dl_opts() {
    if is_root; then printf '%s\n' -o APT::Sandbox::User=root; fi
}

apt_system_update() {
    [[ -n "$APT_UPDATED" ]] && return 0
    APT_UPDATED=1
    is_root || return 1
    log "running apt-get update"
    apt-get -q update >&2
}

apt_use_private() {
    [[ -n "$APT_PRIVATE" ]] && return 0
    [[ -r "$DEBIAN_KEYRING" ]] ||
        die "$DEBIAN_KEYRING is missing (Debian package debian-archive-keyring); cannot use the Debian archive"
    local d
    d="$(cache_dir)/apt"
    mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/sources.list.d"
    cat >"$d/sources.list" <<SOURCES
deb [signed-by=$DEBIAN_KEYRING] http://deb.debian.org/debian $KSMVM_DEBIAN_SUITE main
deb [signed-by=$DEBIAN_KEYRING] http://deb.debian.org/debian-security $KSMVM_DEBIAN_SUITE-security main
SOURCES
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$d/sources.list"
        -o "Dir::Etc::SourceParts=$d/sources.list.d"
        -o "Dir::State::Lists=$d/lists"
        -o "Dir::Cache=$d/cache"
        -o "APT::Architecture=amd64"
        -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
        -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
    )
    if ! is_root; then APT_OPTS+=(-o Debug::NoLocking=1); fi
    APT_PRIVATE=1
    log "using a private apt configuration for Debian $KSMVM_DEBIAN_SUITE in $d"
    # shellcheck disable=SC2046
    apt-get -q "${APT_OPTS[@]}" $(apt_dl_opts) update >&2 ||
        die "apt-get update with the private Debian $KSMVM_DEBIAN_SUITE sources failed (is deb.debian.org reachable?)"
}

# apt_knows PKG: apt has a candidate version for PKG.
apt_knows() {
    local cand
    cand="$(apt-cache "${APT_OPTS[@]}" policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')"
    [[ -n "$cand" && "$cand" != "(none)" ]]
}

# apt_download PKG DIR: download PKG's .deb into DIR and print its path;
# returns 1 when the download fails (e.g. stale package lists: the archive
# has dropped that version).
apt_download() {
    local pkg="$1" dir="$2" deb
    log "downloading $pkg"
    # shellcheck disable=SC2046
    if ! (cd "$dir" && apt-get -q "${APT_OPTS[@]}" $(apt_dl_opts) download "$pkg" >&2); then
        log "apt-get download $pkg failed"
        return 1
    fi
    deb="$(find "$dir" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)"
    [[ -n "$deb" ]] || die "apt-get download $pkg produced no .deb in $dir"
    printf '%s\n' "$deb"
}

# need_cmd CMD PKG: install Debian package PKG when CMD is missing.
need_cmd() {
    local cmd="$1" pkg="$2"
    command -v "$cmd" >/dev/null 2>&1 && return 0
    is_root || die "'$cmd' is missing; install the Debian package $pkg (apt-get install $pkg)"
    log "'$cmd' is missing; installing $pkg"
    if ! DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "$pkg" >&2; then
        apt_system_update || true
        DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "$pkg" >&2 ||
            die "could not install $pkg"
    fi
    command -v "$cmd" >/dev/null 2>&1 || die "installed $pkg but '$cmd' is still missing"
}
