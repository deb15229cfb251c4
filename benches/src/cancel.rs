//! Ctrl-C / SIGTERM handling: the signal only sets a flag; every wait in the
//! harness polls it and returns [`Interrupted`], so that the guards on the
//! way out (guests, KSM settings) run as on any other error.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

static CANCELLED: AtomicBool = AtomicBool::new(false);

/// Polling step of [`sleep`]: how late an interruption is noticed at most.
const STEP: Duration = Duration::from_millis(50);

/// The run was interrupted by SIGINT, SIGTERM or SIGHUP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Installs the handler (once per process).
pub fn install() -> Result<(), ctrlc::Error> {
    ctrlc::set_handler(|| {
        if CANCELLED.swap(true, Ordering::SeqCst) {
            eprintln!("ksmvm-bench: interrupted again; still stopping guests and restoring KSM");
        } else {
            eprintln!("ksmvm-bench: interrupted; stopping guests and restoring KSM settings");
        }
    })
}

pub fn is_cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once a signal arrived.
pub fn check() -> Result<(), Interrupted> {
    if is_cancelled() {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

/// Sleeps for `d`, waking early (with an error) when interrupted.
pub fn sleep(d: Duration) -> Result<(), Interrupted> {
    let end = Instant::now() + d;
    loop {
        check()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        thread::sleep(left.min(STEP));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_without_signal_sleeps() {
        let t = Instant::now();
        sleep(Duration::from_millis(60)).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(60));
        assert!(check().is_ok());
    }
}
