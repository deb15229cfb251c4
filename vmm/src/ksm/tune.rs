//! Validated KSM tuning: the knobs an operator may set, shared by
//! `ksmvm ksm tune` and the TOML file of `ksmvm ksm apply`.

use std::ops::RangeInclusive;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::sysfs;
use super::types::{bool_value, AdvisorMode, RunMode};
use super::KsmError;

pub const PAGES_TO_SCAN_RANGE: RangeInclusive<u64> = 1..=100_000;
/// 0 would make ksmd spin without sleeping.
pub const SLEEP_MILLISECS_RANGE: RangeInclusive<u64> = 1..=3_600_000;
pub const ADVISOR_TARGET_SCAN_TIME_RANGE: RangeInclusive<u64> = 1..=86_400;
/// The kernel's own lower bound: a KSM page needs at least two sharers.
pub const MAX_PAGE_SHARING_RANGE: RangeInclusive<u64> = 2..=(i32::MAX as u64);

/// Knobs to change; `None` leaves a knob as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KsmTuning {
    pub pages_to_scan: Option<u64>,
    pub sleep_millisecs: Option<u64>,
    pub advisor_mode: Option<AdvisorMode>,
    /// Seconds.
    pub advisor_target_scan_time: Option<u64>,
    pub use_zero_pages: Option<bool>,
    pub max_page_sharing: Option<u64>,
    pub merge_across_nodes: Option<bool>,
    /// Start (true) or stop (false) ksmd after the other knobs are set.
    /// Stopping leaves merged pages merged.
    pub enabled: Option<bool>,
}

fn check(
    knob: &'static str,
    value: Option<u64>,
    range: RangeInclusive<u64>,
) -> Result<(), KsmError> {
    match value {
        Some(v) if !range.contains(&v) => Err(KsmError::InvalidValue {
            knob,
            problem: format!("{v} is out of range {}..={}", range.start(), range.end()),
        }),
        _ => Ok(()),
    }
}

impl KsmTuning {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Checks ranges and combinations without touching the kernel.
    pub fn validate(&self) -> Result<(), KsmError> {
        check("pages_to_scan", self.pages_to_scan, PAGES_TO_SCAN_RANGE)?;
        check(
            "sleep_millisecs",
            self.sleep_millisecs,
            SLEEP_MILLISECS_RANGE,
        )?;
        check(
            "advisor_target_scan_time",
            self.advisor_target_scan_time,
            ADVISOR_TARGET_SCAN_TIME_RANGE,
        )?;
        check(
            "max_page_sharing",
            self.max_page_sharing,
            MAX_PAGE_SHARING_RANGE,
        )?;
        if self.pages_to_scan.is_some() && self.advisor_mode == Some(AdvisorMode::ScanTime) {
            return Err(advisor_owns_pages_to_scan());
        }
        Ok(())
    }

    /// Writes the requested knobs in an order the kernel accepts.
    ///
    /// Stops at the first failure; the error names the knob.
    pub(crate) fn apply(&self, root: &Path) -> Result<(), KsmError> {
        self.validate()?;
        if self.pages_to_scan.is_some() && self.advisor_mode.is_none() {
            // The kernel answers a bare EINVAL; say why instead.
            let current = super::settings::KsmSettings::read(root)?.advisor_mode;
            if current == Some(AdvisorMode::ScanTime) {
                return Err(advisor_owns_pages_to_scan());
            }
        }
        let num = |knob, v: Option<u64>| match v {
            Some(v) => sysfs::write(root, knob, &v.to_string()),
            None => Ok(()),
        };
        let flag = |knob, v: Option<bool>| match v {
            Some(v) => sysfs::write(root, knob, bool_value(v)),
            None => Ok(()),
        };
        num("advisor_target_scan_time", self.advisor_target_scan_time)?;
        // Changing the advisor mode resets pages_to_scan, so it goes first.
        if let Some(mode) = self.advisor_mode {
            sysfs::write(root, "advisor_mode", mode.sysfs_value())?;
        }
        num("pages_to_scan", self.pages_to_scan)?;
        num("sleep_millisecs", self.sleep_millisecs)?;
        flag("use_zero_pages", self.use_zero_pages)?;
        num("max_page_sharing", self.max_page_sharing)?;
        flag("merge_across_nodes", self.merge_across_nodes)?;
        if let Some(on) = self.enabled {
            let mode = if on { RunMode::Run } else { RunMode::Stop };
            sysfs::write(root, "run", mode.sysfs_value())?;
        }
        Ok(())
    }
}

fn advisor_owns_pages_to_scan() -> KsmError {
    KsmError::InvalidValue {
        knob: "pages_to_scan",
        problem: "cannot be set while advisor_mode is scan-time (the advisor sets it); \
                  set advisor_mode to none as well"
            .into(),
    }
}
