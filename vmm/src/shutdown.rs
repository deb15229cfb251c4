//! Graceful stop: the first SIGTERM/SIGINT asks the guest to shut down and
//! starts a timer; the VM is stopped when the timer runs out or when a
//! second signal comes. A zero timeout stops at once, as before.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAction {
    /// Ask the guest to shut down (Ctrl-Alt-Del) and wait for it.
    AskGuest,
    /// Stop the VM now.
    StopNow,
}

#[derive(Debug)]
pub struct GracefulShutdown {
    timeout: Duration,
    deadline: Option<Instant>,
}

impl GracefulShutdown {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            deadline: None,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// What a stop signal received at `now` should do.
    pub fn on_signal(&mut self, now: Instant) -> StopAction {
        if self.timeout.is_zero() || self.deadline.is_some() {
            return StopAction::StopNow;
        }
        self.deadline = Some(now + self.timeout);
        StopAction::AskGuest
    }

    /// When the guest's time to shut down runs out, once it was asked.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_signal_asks_second_stops() {
        let t0 = Instant::now();
        let mut g = GracefulShutdown::new(Duration::from_secs(5));
        assert_eq!(g.deadline(), None);
        assert!(!g.expired(t0 + Duration::from_secs(100)));
        assert_eq!(g.on_signal(t0), StopAction::AskGuest);
        assert_eq!(g.deadline(), Some(t0 + Duration::from_secs(5)));
        assert!(!g.expired(t0 + Duration::from_secs(4)));
        assert!(g.expired(t0 + Duration::from_secs(5)));
        assert_eq!(g.on_signal(t0), StopAction::StopNow);
    }

    #[test]
    fn zero_timeout_stops_at_once() {
        let mut g = GracefulShutdown::new(Duration::ZERO);
        assert_eq!(g.on_signal(Instant::now()), StopAction::StopNow);
        assert_eq!(g.deadline(), None);
    }
}
