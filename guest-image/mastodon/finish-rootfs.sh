#!/usr/bin/env bash
# mmdebstrap customize hook, last: remove build-time state that would differ
# between builds or leak into every instance.
set -euo pipefail
R="$1"
rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/var/cache/debconf/*-old \
       "$R"/var/lib/dpkg/*-old "$R"/tmp/* "$R"/var/tmp/* "$R"/root/.cache "$R"/home/mastodon/.cache
find "$R/var/log" -type f -exec truncate -s 0 {} +
# Keep /etc/.updated and /var/.updated consistent with /usr (ConditionNeedsUpdate).
touch -r "$R/usr" "$R/etc/.updated" "$R/var/.updated"
