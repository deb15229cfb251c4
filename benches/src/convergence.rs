//! When has KSM converged? At each completed full scan (the host's
//! `full_scans` counter advancing) the harness records `pages_sharing`;
//! KSM has converged once at least `min_scans` scans completed since the
//! start and the last two scan-end values agree within a tolerance.
//!
//! Three scans ([`MIN_SCANS`]): ksmd adds a newly mergeable process just
//! behind its scanning cursor, so the scan in progress when a guest starts
//! does not see it; the next one only records each page's checksum; pages
//! merge on the visit after that. Comparing the ends of scans 2 and 3 would
//! otherwise find "stable" values from before any merging.

use ksmvm::stats::ApproxF64;

/// Full scans that must complete before the value can count as stable.
pub const MIN_SCANS: u64 = 3;

/// Minimum change (pages) that counts as "not yet stable".
pub const MIN_TOLERANCE_PAGES: u64 = 16;
/// ...or this fraction of the value, whichever is larger.
pub const TOLERANCE_FRACTION: f64 = 0.005;

#[derive(Debug, Clone)]
pub struct Convergence {
    start_scans: u64,
    min_scans: u64,
    last_scans: u64,
    /// pages_sharing at each scan end seen, in order.
    at_scan_end: Vec<u64>,
    converged_at: Option<f64>,
}

impl Convergence {
    /// `full_scans` as read when waiting starts.
    pub fn new(start_scans: u64, min_scans: u64) -> Self {
        Self {
            start_scans,
            min_scans: min_scans.max(2),
            last_scans: start_scans,
            at_scan_end: Vec::new(),
            converged_at: None,
        }
    }

    /// Feeds one reading (seconds since start); returns whether converged.
    pub fn observe(&mut self, t: f64, full_scans: u64, pages_sharing: u64) -> bool {
        if self.converged_at.is_some() {
            return true;
        }
        if full_scans > self.last_scans {
            self.last_scans = full_scans;
            self.at_scan_end.push(pages_sharing);
        }
        if self.scans() >= self.min_scans && self.stable() {
            self.converged_at = Some(t);
        }
        self.converged_at.is_some()
    }

    fn stable(&self) -> bool {
        match self.at_scan_end.as_slice() {
            [.., a, b] => {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a non-negative fraction of a u64, rounded down"
                )]
                let fraction = (b.approx_f64() * TOLERANCE_FRACTION) as u64;
                let tol = MIN_TOLERANCE_PAGES.max(fraction);
                a.abs_diff(*b) <= tol
            }
            _ => false,
        }
    }

    /// Full scans completed since the start.
    pub fn scans(&self) -> u64 {
        self.last_scans - self.start_scans
    }

    pub fn converged_at(&self) -> Option<f64> {
        self.converged_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_two_scans_and_a_stable_value() {
        let mut c = Convergence::new(10, 2);
        assert!(!c.observe(0.5, 10, 0));
        assert!(!c.observe(1.0, 11, 0)); // first scan end: checksums only
        assert!(!c.observe(1.5, 11, 5000));
        assert!(!c.observe(2.0, 12, 40000)); // merged in scan 2: not stable yet
        assert!(!c.observe(2.5, 12, 40010));
        assert!(c.observe(3.0, 13, 40020)); // scan 3 ends within tolerance
        assert_eq!(c.converged_at(), Some(3.0));
        assert_eq!(c.scans(), 3);
        assert!(c.observe(9.0, 13, 0), "stays converged");
    }

    #[test]
    fn nothing_to_merge_converges_after_two_scans() {
        let mut c = Convergence::new(0, 2);
        assert!(!c.observe(1.0, 1, 0));
        assert!(c.observe(2.0, 2, 0));
    }

    #[test]
    fn skipped_scan_ends_count_as_one_reading() {
        let mut c = Convergence::new(5, 2);
        assert!(!c.observe(1.0, 8, 100)); // three scans in one interval
        assert_eq!(c.scans(), 3);
        assert!(c.observe(2.0, 9, 100));
    }

    #[test]
    fn three_scans_skip_the_pre_merge_plateau() {
        // Guest started during scan 11; scan 12 records checksums, scan 13 merges.
        let mut c = Convergence::new(10, MIN_SCANS);
        assert!(!c.observe(1.0, 11, 0));
        assert!(!c.observe(2.0, 12, 0)); // would be "stable" with two scans
        assert!(!c.observe(3.0, 13, 30000));
        assert!(c.observe(4.0, 14, 30000));
    }

    #[test]
    fn tolerance_scales_with_the_value() {
        let mut c = Convergence::new(0, 2);
        c.observe(1.0, 1, 1_000_000);
        assert!(c.observe(2.0, 2, 1_004_000)); // 0.4 % < 0.5 %
        let mut c = Convergence::new(0, 2);
        c.observe(1.0, 1, 1_000_000);
        assert!(!c.observe(2.0, 2, 1_010_000));
    }
}
