#!/usr/bin/env bash
# mmdebstrap customize hook: install the Mastodon application into the root
# image at /home/mastodon/live. Needs github.com, rubygems.org and
# registry.npmjs.org (build-rootfs.sh checks first). $1: the root directory.
#
# Follows Mastodon's production guide (git checkout of a release tag,
# `bundle install` in deployment mode without development/test groups,
# `yarn install`, `rails assets:precompile`), with Debian's Ruby (3.1, which
# Mastodon 4.3 supports) and Node.js (18) instead of rbenv/nodesource, and
# with the per-instance paths pointing at the data disk.
set -euo pipefail
R="$1"
VERSION="${MASTODON_VERSION:?}"
in_root() { chroot "$R" "$@"; }
as_mastodon() { chroot "$R" runuser -u mastodon -- env HOME=/home/mastodon "$@"; }

# The shared memory of the running instances is the point: no DNS for the
# build from the image's resolv.conf (a symlink into /run): use the host's.
rm -f "$R/etc/resolv.conf"
cp /etc/resolv.conf "$R/etc/resolv.conf"

build_deps="git build-essential pkg-config autoconf bison ruby-dev libpq-dev libxml2-dev libxslt1-dev
            libyaml-dev libicu-dev libidn-dev libssl-dev libffi-dev libgdbm-dev libreadline-dev
            zlib1g-dev libjemalloc-dev npm"
in_root apt-get update
# shellcheck disable=SC2086
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $build_deps

as_mastodon git -c advice.detachedHead=false clone --depth 1 --branch "$VERSION" \
    https://github.com/mastodon/mastodon.git /home/mastodon/live
in_root sh -c "cd /home/mastodon/live && git rev-parse HEAD >/home/mastodon/live/REVISION"

# Bundler: the version the lockfile was made with, system-wide (/usr/local/bin/bundle).
bundler_version="$(awk '/^BUNDLED WITH/{getline; print $1}' "$R/home/mastodon/live/Gemfile.lock")"
in_root gem install --no-document "bundler:${bundler_version:-2.5.0}"
# Yarn (Mastodon 4.3 pins Yarn 4 through corepack).
in_root npm install -g --no-fund --no-audit corepack
in_root corepack enable

as_mastodon sh -euc '
    cd /home/mastodon/live
    /usr/local/bin/bundle config set --local deployment true
    /usr/local/bin/bundle config set --local without "development test"
    /usr/local/bin/bundle config set --local silence_root_warning true
    /usr/local/bin/bundle install -j"$(nproc)"
    COREPACK_ENABLE_DOWNLOAD_PROMPT=0 yarn install --immutable
    RAILS_ENV=production NODE_ENV=production SECRET_KEY_BASE_DUMMY=1 \
        OTP_SECRET=precompile_placeholder SECRET_KEY_BASE=precompile_placeholder \
        ACTIVE_RECORD_ENCRYPTION_DETERMINISTIC_KEY=precompile_placeholder \
        ACTIVE_RECORD_ENCRYPTION_KEY_DERIVATION_SALT=precompile_placeholder \
        ACTIVE_RECORD_ENCRYPTION_PRIMARY_KEY=precompile_placeholder \
        /usr/local/bin/bundle exec rails assets:precompile
    yarn cache clean --all || true
'

# Per-instance paths live on the data disk (/data/mastodon, laid out by
# ksmvm-data-setup); the root only holds symlinks to them.
L="$R/home/mastodon/live"
rm -rf "$L/log" "$L/tmp" "$L/public/system" "$L/.env.production" "$L/node_modules/.cache"
ln -s /data/mastodon/log "$L/log"
ln -s /data/mastodon/tmp "$L/tmp"
ln -s /data/mastodon/system "$L/public/system"
ln -s /data/mastodon/.env.production "$L/.env.production"
[ -x "$R/usr/local/bin/bundle" ] || { echo "install-mastodon: bundler did not land in /usr/local/bin" >&2; exit 1; }

# The instance's nginx site replaces Debian's default site.
rm -f "$R/etc/nginx/sites-enabled/default"
ln -sf ../sites-available/mastodon "$R/etc/nginx/sites-enabled/mastodon"

# Build-only packages go; the runtime libraries are in packages.txt (manual).
# shellcheck disable=SC2086
in_root env DEBIAN_FRONTEND=noninteractive apt-get purge -y --auto-remove $build_deps
in_root apt-get clean
rm -rf "$R/home/mastodon/.cache" "$R/home/mastodon/.npm" "$R/home/mastodon/.yarn" "$R/root/.npm"
ln -sfn ../run/ksmvm/resolv.conf "$R/etc/resolv.conf"
echo "install-mastodon: installed Mastodon $VERSION ($(cat "$L/REVISION"))" >&2
