//! Rate-limited logging for conditions that an outsider can repeat at will:
//! a guest hitting the same malformed-access path millions of times a
//! second, a client flood that keeps `accept` failing with EMFILE. Logging
//! each one would turn the host's log into a denial-of-service tool, so
//! each call site gets its own budget and says how many it held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many messages one call site of [`warn_ratelimited!`] may log per window.
const BURST: u32 = 10;
/// The window after which the budget refills.
const WINDOW: Duration = Duration::from_secs(5);

/// The budget of one call site: `burst` messages per `window`.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<Option<Window>>,
}

#[derive(Debug)]
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
    /// The budget of [`warn_ratelimited!`]: 10 messages per 5 s.
    pub const fn new() -> Self {
        Self::with_budget(BURST, WINDOW)
    }

    /// At most `burst` messages per `window`.
    pub const fn with_budget(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            state: Mutex::new(None),
        }
    }

    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// [`check`](Self::check) at a given time (for tests).
    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let w = guard.get_or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(w.start) >= self.window {
            w.start = now;
            w.logged = 0;
        }
        if w.logged < self.burst {
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

/// `log::warn!` with a per-call-site budget (see [`RateLimiter`]): at most
/// 10 messages per 5 s; the first one after a pause says how many similar
/// messages were suppressed.
#[macro_export]
macro_rules! warn_ratelimited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::logger::RateLimiter = $crate::logger::RateLimiter::new();
        if let $crate::logger::Verdict::Log { suppressed } = LIMITER.check() {
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
    fn a_custom_budget() {
        let rl = RateLimiter::with_budget(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(rl.check_at(t0), Verdict::Log { suppressed: 0 });
        assert_eq!(rl.check_at(t0), Verdict::Log { suppressed: 0 });
        assert_eq!(rl.check_at(t0 + Duration::from_secs(59)), Verdict::Suppress);
        assert_eq!(
            rl.check_at(t0 + Duration::from_secs(60)),
            Verdict::Log { suppressed: 1 }
        );
    }

    #[test]
    fn macro_expands_at_many_sites() {
        for i in 0..100 {
            crate::warn_ratelimited!("test message {i}");
        }
    }
}
