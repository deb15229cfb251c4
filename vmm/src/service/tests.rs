//! The unit file's stop timeout against the VMM's own.

use std::time::Duration;

use super::STOP_MARGIN;
use crate::config::DEFAULT_SHUTDOWN_TIMEOUT_S;

const UNIT: &str = include_str!("../../systemd/ksmvm@.service");

/// The value of `key=` in the unit (the last one, as systemd reads it).
fn directive<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

fn seconds(v: &str) -> Duration {
    let n = v.strip_suffix('s').unwrap_or(v);
    Duration::from_secs(n.parse().unwrap_or_else(|_| panic!("not seconds: {v}")))
}

#[test]
fn the_unit_lets_the_default_stop_finish() {
    let stop = seconds(directive(UNIT, "TimeoutStopSec").expect("TimeoutStopSec="));
    let needed = Duration::from_secs(DEFAULT_SHUTDOWN_TIMEOUT_S) + STOP_MARGIN;
    // Room for the default stop without EXTEND_TIMEOUT_USEC, a margin for a
    // slow host, and not much more: a wedged VMM is killed at this time.
    assert!(
        stop >= needed + Duration::from_secs(5) && stop <= needed + Duration::from_secs(30),
        "TimeoutStopSec={stop:?} for a default stop of {needed:?}"
    );
    assert_eq!(DEFAULT_SHUTDOWN_TIMEOUT_S, 30);
}
