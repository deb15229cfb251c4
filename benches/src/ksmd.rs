//! ksmd's CPU use between successive samples (non-blocking, unlike
//! `Ksm::ksmd_cpu`, which sleeps for its window).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ksmvm::ksm::{find_ksmd, parse_stat_ticks};
use ksmvm::stats::ApproxF64;

/// Shortest window a CPU percentage is computed over.
pub const MIN_WINDOW: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct KsmdMeter {
    pid: Option<u32>,
    hz: f64,
    last: Option<(Instant, u64)>,
}

impl KsmdMeter {
    pub fn new() -> Self {
        let pid = find_ksmd(Path::new("/proc")).ok().flatten();
        let hz = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
            Ok(Some(t)) if t > 0 => t.approx_f64(),
            _ => 100.0,
        };
        let mut m = Self {
            pid,
            hz,
            last: None,
        };
        m.last = m.read().map(|t| (Instant::now(), t));
        m
    }

    fn read(&self) -> Option<u64> {
        let text = fs::read_to_string(format!("/proc/{}/stat", self.pid?)).ok()?;
        parse_stat_ticks(&text)
    }

    /// Percent of one CPU since the previous reading; None without a
    /// visible ksmd, or when less than [`MIN_WINDOW`] passed (CPU time
    /// comes in clock ticks, so a short window would be mostly rounding;
    /// the reading then stays the reference for the next call).
    pub fn sample(&mut self) -> Option<f64> {
        let now = Instant::now();
        let ticks = self.read()?;
        let Some((t0, k0)) = self.last else {
            self.last = Some((now, ticks));
            return None;
        };
        let secs = now.duration_since(t0).as_secs_f64();
        if secs < MIN_WINDOW.as_secs_f64() {
            return None;
        }
        self.last = Some((now, ticks));
        Some(100.0 * ticks.saturating_sub(k0).approx_f64() / self.hz / secs)
    }

    /// Total ksmd CPU seconds so far (for averages over an interval).
    pub fn cpu_seconds(&self) -> Option<f64> {
        Some(self.read()?.approx_f64() / self.hz)
    }
}

impl Default for KsmdMeter {
    fn default() -> Self {
        Self::new()
    }
}
