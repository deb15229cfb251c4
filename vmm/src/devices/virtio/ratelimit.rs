//! Rate-limited logging for guest-triggered conditions.
//!
//! A guest can hit the same malformed-access path millions of times a
//! second; logging each one would turn the host's log into the guest's
//! denial-of-service tool. Each call site gets its own budget.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many messages one call site may log per window.
const BURST: u32 = 10;
/// The window after which the budget refills.
const WINDOW: Duration = Duration::from_secs(5);

/// The budget of one call site.
pub struct RateLimiter {
    state: Mutex<Option<Window>>,
}

struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// What a call site should do with its message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` messages were dropped since the last one logged.
    Log { suppressed: u64 },
    /// Drop it.
    Suppress,
}

impl RateLimiter {
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(None),
        }
    }

    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Verdict {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let w = guard.get_or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(w.start) >= WINDOW {
            w.start = now;
            w.logged = 0;
        }
        if w.logged < BURST {
            w.logged += 1;
            let suppressed = std::mem::take(&mut w.suppressed);
            Verdict::Log { suppressed }
        } else {
            w.suppressed += 1;
            Verdict::Suppress
        }
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `log::warn!` with a per-call-site budget (see [`RateLimiter`]).
macro_rules! warn_ratelimited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::devices::virtio::ratelimit::RateLimiter =
            $crate::devices::virtio::ratelimit::RateLimiter::new();
        if let $crate::devices::virtio::ratelimit::Verdict::Log { suppressed } = LIMITER.check() {
            if suppressed > 0 {
                log::warn!("{} ({} similar messages suppressed)", format_args!($($arg)+), suppressed);
            } else {
                log::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_suppresses_and_counts_until_the_window_ends() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(rl.check_at(t0), Verdict::Log { suppressed: 0 });
        }
        assert_eq!(rl.check_at(t0), Verdict::Suppress);
        assert_eq!(rl.check_at(t0 + Duration::from_secs(1)), Verdict::Suppress);
        assert_eq!(
            rl.check_at(t0 + WINDOW),
            Verdict::Log { suppressed: 2 },
            "the next window reports what was dropped"
        );
    }

    #[test]
    fn macro_expands_at_many_sites() {
        for i in 0..100 {
            warn_ratelimited!("test message {i}");
        }
    }
}
