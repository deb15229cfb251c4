//! When to send WATCHDOG=1: every half of systemd's WatchdogSec, as
//! sd_watchdog_enabled(3) advises, from the main loop, so that a wedged loop
//! misses its pings and systemd restarts the VMM.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogAction {
    Ping,
    /// Not due yet (or pinging has stopped).
    Wait,
    /// Fault injection: pinging stops now, for good.
    Stop,
}

#[derive(Debug)]
pub struct Watchdog {
    period: Duration,
    next: Instant,
    /// Fault injection: stop pinging at this time.
    stop_at: Option<Instant>,
    stopped: bool,
}

impl Watchdog {
    /// `timeout` is systemd's WATCHDOG_USEC.
    pub fn new(timeout: Duration, now: Instant, stop_after: Option<Duration>) -> Self {
        Self {
            period: (timeout / 2).max(Duration::from_millis(1)),
            next: now,
            stop_at: stop_after.map(|d| now + d),
            stopped: false,
        }
    }

    /// When `poll` has something to do next.
    pub fn next_due(&self) -> Option<Instant> {
        if self.stopped {
            return None;
        }
        Some(match self.stop_at {
            Some(s) => s.min(self.next),
            None => self.next,
        })
    }

    pub fn poll(&mut self, now: Instant) -> WatchdogAction {
        if self.stopped {
            return WatchdogAction::Wait;
        }
        if self.stop_at.is_some_and(|s| now >= s) {
            self.stopped = true;
            return WatchdogAction::Stop;
        }
        if now < self.next {
            return WatchdogAction::Wait;
        }
        self.next = now + self.period;
        WatchdogAction::Ping
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_every_half_timeout() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(Duration::from_secs(10), t0, None);
        assert_eq!(w.poll(t0), WatchdogAction::Ping);
        assert_eq!(w.next_due(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(w.poll(t0 + Duration::from_secs(4)), WatchdogAction::Wait);
        assert_eq!(w.poll(t0 + Duration::from_secs(5)), WatchdogAction::Ping);
    }

    #[test]
    fn fault_injection_stops_pinging() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(Duration::from_secs(10), t0, Some(Duration::from_secs(3)));
        assert_eq!(w.poll(t0), WatchdogAction::Ping);
        assert_eq!(w.next_due(), Some(t0 + Duration::from_secs(3)));
        assert_eq!(w.poll(t0 + Duration::from_secs(3)), WatchdogAction::Stop);
        assert_eq!(w.next_due(), None);
        assert_eq!(w.poll(t0 + Duration::from_secs(60)), WatchdogAction::Wait);
    }
}
