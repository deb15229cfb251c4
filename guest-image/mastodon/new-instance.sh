#!/usr/bin/env bash
# Create one Mastodon instance for ksmvm: its data disk and its config.
#
#   new-instance.sh NAME DOMAIN [OUTDIR]
#
# Writes OUTDIR/NAME.data.ext4 (a sparse ext4 image, DATA_SIZE, default 4G)
# holding ksmvm/instance.env and ksmvm/secrets.env, and OUTDIR/NAME.toml (a
# ksmvm instance config). Everything else on the data disk (PostgreSQL
# cluster, Redis dump, media, logs, the /var overlay) is created by the guest
# on first boot. No root privileges are needed.
#
# Environment:
#   KERNEL, ROOTFS   paths written into NAME.toml (default: the cached build
#                    in ${KSMVM_CACHE:-~/.cache/ksmvm})
#   DATA_SIZE        data disk size (mke2fs syntax; default 4G)
#   ADDRESS, GATEWAY, DNS  static network (e.g. 10.0.3.12/24, 10.0.3.1,
#                    "1.1.1.1 9.9.9.9"); empty ADDRESS: DHCP
#   MEM_MIB (1024), VCPUS (1)
#   TEST_CONSOLE=1   a root shell protocol on the serial console for ksmvm's
#                    tests (ksmvm-test-console.service); never for production
set -euo pipefail
PROG=new-instance
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }

NAME="${1:-}" DOMAIN="${2:-}" OUTDIR="${3:-.}"
[[ -n "$NAME" && -n "$DOMAIN" ]] || die "usage: new-instance.sh NAME DOMAIN [OUTDIR]"
# NAME is also the TAP device name: at most 15 bytes.
[[ "$NAME" =~ ^[a-z0-9][a-z0-9-]{0,14}$ ]] ||
    die "NAME must be 1-15 characters of a-z, 0-9 and '-' (it names the TAP device): '$NAME'"
[[ "$DOMAIN" =~ ^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]{2,63}$ ]] ||
    die "DOMAIN does not look like a domain name: '$DOMAIN'"
for tool in mke2fs openssl od; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install e2fsprogs openssl coreutils)"
done

CACHE="${KSMVM_CACHE:-${HOME:?}/.cache/ksmvm}"
KERNEL="$(realpath -m -- "${KERNEL:-$CACHE/kernel/current/vmlinux}")"
ROOTFS="$(realpath -m -- "${ROOTFS:-$CACHE/rootfs/root.ext4}")"
DATA_SIZE="${DATA_SIZE:-4G}"
MEM_MIB="${MEM_MIB:-1024}"
VCPUS="${VCPUS:-1}"
ADDRESS="${ADDRESS:-}" GATEWAY="${GATEWAY:-}" DNS="${DNS:-}"
TEST_CONSOLE="${TEST_CONSOLE:-0}"
[[ "$TEST_CONSOLE" == 0 || "$TEST_CONSOLE" == 1 ]] || die "TEST_CONSOLE must be 0 or 1"

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
DATA="$OUTDIR/$NAME.data.ext4"
TOML="$OUTDIR/$NAME.toml"
[[ ! -e "$DATA" ]] || die "$DATA exists; remove it first (it holds the instance's database)"

# --- secrets, all from /dev/urandom -------------------------------------
hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
alnum() { LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c "$1"; }
b64url() { xxd -r -p | base64 -w0 | tr '+/' '-_'; }
command -v xxd >/dev/null || b64url() { python3 -c 'import sys,base64,binascii; sys.stdout.write(base64.urlsafe_b64encode(binascii.unhexlify(sys.stdin.read().strip())).decode())'; }

machine_id="$(hex 16)"
mac="$(printf '02:%s' "$(hex 5 | sed 's/../&:/g; s/:$//')")"
# VAPID (Web Push) key pair: P-256, as Mastodon's webpush gem encodes it
# (URL-safe base64 of the raw private scalar / the uncompressed public point).
keytext="$(openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl ec -text -noout 2>/dev/null)"
vapid_priv="$(awk '/^priv:/{f=1;next} /^pub:/{f=0} f' <<<"$keytext" | tr -d ' :\n' | sed 's/^00\(.\{64\}\)$/\1/' | b64url)"
vapid_pub="$(awk '/^pub:/{f=1;next} /^ASN1/{f=0} f' <<<"$keytext" | tr -d ' :\n' | b64url)"
[[ -n "$vapid_priv" && -n "$vapid_pub" ]] || die "could not generate the VAPID key pair with openssl"

stage="$(mktemp -d "${TMPDIR:-/tmp}/ksmvm-instance.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
umask 077
mkdir -p "$stage/ksmvm"
cat >"$stage/ksmvm/instance.env" <<ENV
# ksmvm Mastodon instance (written by new-instance.sh $(date -u +%Y-%m-%d))
NAME=$NAME
DOMAIN=$DOMAIN
MACHINE_ID=$machine_id
MAC=$mac
# Network: empty ADDRESS means DHCP on the virtio-net interface.
ADDRESS=$ADDRESS
GATEWAY=$GATEWAY
DNS="$DNS"
ENV
cat >"$stage/ksmvm/secrets.env" <<ENV
SECRET_KEY_BASE=$(hex 64)
OTP_SECRET=$(hex 64)
VAPID_PRIVATE_KEY=$vapid_priv
VAPID_PUBLIC_KEY=$vapid_pub
ACTIVE_RECORD_ENCRYPTION_DETERMINISTIC_KEY=$(alnum 32)
ACTIVE_RECORD_ENCRYPTION_KEY_DERIVATION_SALT=$(alnum 32)
ACTIVE_RECORD_ENCRYPTION_PRIMARY_KEY=$(alnum 32)
ENV
cat >"$stage/ksmvm/mastodon.env" <<'ENV'
# Optional .env.production overrides for this instance (SMTP_*, S3_*, ...),
# appended last by mastodon-instance-setup at every boot.
ENV
umask 022
[[ "$TEST_CONSOLE" == 0 ]] || : >"$stage/ksmvm/test-console"

mke2fs -q -t ext4 -L "data-$NAME" -E root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1 -m 0 -d "$stage" "$DATA" "$DATA_SIZE" >/dev/null

# ksmvm's default command line (ksmvm::config::DEFAULT_CMDLINE), then the
# root disk and what this image wants.
cmdline="console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp"
cmdline+=" root=/dev/vda ro rootfstype=ext4 init_on_free=1 quiet"
cmdline+=" systemd.machine_id=$machine_id systemd.hostname=$NAME"
cat >"$TOML" <<TOML
# ksmvm instance config for Mastodon instance "$NAME" ($DOMAIN), written by
# guest-image/mastodon/new-instance.sh. Format: docs/systemd.md ("Instance
# files": the keys are the \`ksmvm run\` flags). Install it as
# /etc/ksmvm/$NAME.toml and \`systemctl enable --now ksmvm@$NAME\`.
name = "$NAME"
# The same kernel file for every instance (identical kernel pages).
kernel = "$KERNEL"
# virtio-mmio devices add their own parameters (virtio_mmio.device=...).
# init_on_free=1: freed guest pages are zeroed, so the host merges them into
# the zero page; systemd.machine_id/hostname: per-instance identity without
# writing to the shared root.
cmdline = "$cmdline"
mem_mib = $MEM_MIB
vcpus = $VCPUS
ksm = true
serial = "file:$OUTDIR/$NAME.console.log"
# The guest powers off on Ctrl-Alt-Del (ctrl-alt-del.target -> poweroff).
shutdown_timeout_s = 60
# Printed by ksmvm-ready.service after multi-user.target, once PostgreSQL,
# Redis, nginx (and Mastodon, when installed) are active:
#   KSMVM-READY ok postgresql@15-main=active redis-server=active nginx=active ...
# ("KSMVM-READY fail ..." when one is not).
ready = "guest"
ready_marker = "KSMVM-READY ok"

# The shared root: one image, read-only, the same file for every instance.
[[disk]]
path = "$ROOTFS"
ro = true
id = "root"

# This instance's data: PostgreSQL, Redis, media, logs, identity, secrets.
[[disk]]
path = "$DATA"
id = "data"

# The TAP device must exist (e.g. ip tuntap add dev $NAME mode tap).
[[net]]
tap = "$NAME"
mac = "$mac"

# Free page reporting: pages the guest frees go back to the host.
[balloon]
free-page-reporting = true
TOML
echo "$TOML"
