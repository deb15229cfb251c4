#!/usr/bin/env bash
# mmdebstrap customize hook: make the root work read-only and identical for
# every instance. $1 is the root directory (inside mmdebstrap's namespace).
set -euo pipefail
R="$1"
in_root() { chroot "$R" "$@"; }

# Identity comes from the kernel command line / data disk, never the image.
: >"$R/etc/machine-id"                      # empty: systemd.machine_id= or transient
rm -f "$R/var/lib/dbus/machine-id"
ln -sf /etc/machine-id "$R/var/lib/dbus/machine-id"
echo ksmvm >"$R/etc/hostname"               # overridden by systemd.hostname=
ln -sfn ../run/ksmvm/resolv.conf "$R/etc/resolv.conf"
# Mount point of the data disk (the root is read-only: it must exist).
install -d -m 0755 "$R/data"

# PostgreSQL: keep the cluster's configuration (/etc/postgresql/15/main),
# drop its data (initdb on each data disk: ksmvm-pg-init), local-only, no SSL
# (the build-time snakeoil key would be the same in every instance).
sed -i -E "s/^#?ssl = .*/ssl = off/" "$R/etc/postgresql/15/main/postgresql.conf"
rm -rf "$R/var/lib/postgresql/15/main"
rm -f "$R/etc/ssl/private/ssl-cert-snakeoil.key" "$R/etc/ssl/certs/ssl-cert-snakeoil.pem"
# Redis: the stock configuration already keeps its dump in /var/lib/redis.
# nginx: the proxy cache directory (on the /var overlay).
install -d -m 0700 "$R/var/cache/nginx"
in_root chown www-data:www-data /var/cache/nginx

# The Mastodon user exists in every image so that uids are identical whether
# or not the application is installed.
in_root useradd --create-home --user-group --shell /bin/bash --comment Mastodon mastodon

# Units.
in_root systemctl set-default multi-user.target
# The VMM stops a guest with Ctrl-Alt-Del: power off rather than reboot.
ln -sfn /lib/systemd/system/poweroff.target "$R/etc/systemd/system/ctrl-alt-del.target"
in_root systemctl enable ksmvm-data.service ksmvm-ready.service ksmvm-test-console.service systemd-networkd.service \
    mastodon-setup.service mastodon-web.service mastodon-sidekiq.service mastodon-streaming.service
# Periodic jobs that would wake ~100 idle guests for nothing, and
# first-boot/update jobs that want to write to /etc or /usr.
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer \
    ldconfig.service systemd-update-done.service systemd-journal-catalog-update.service \
    systemd-hwdb-update.service systemd-machine-id-commit.service systemd-firstboot.service \
    getty@tty1.service
if [ -e "$R/lib/systemd/system/man-db.timer" ]; then in_root systemctl mask man-db.timer; fi
