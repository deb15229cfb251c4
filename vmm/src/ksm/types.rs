//! Value types of KSM knobs that are not plain numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `run`: what ksmd does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    /// 0: ksmd sleeps; merged pages stay merged.
    Stop,
    /// 1: ksmd scans and merges.
    Run,
    /// 2: stop and unmerge every merged page (the value stays 2 afterwards).
    Unmerge,
}

impl RunMode {
    pub fn sysfs_value(self) -> &'static str {
        match self {
            Self::Stop => "0",
            Self::Run => "1",
            Self::Unmerge => "2",
        }
    }
}

impl FromStr for RunMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        // The kernel may report other bits (4: offlining) only transiently.
        match s.trim() {
            "0" => Ok(Self::Stop),
            "1" => Ok(Self::Run),
            "2" => Ok(Self::Unmerge),
            _ => Err(()),
        }
    }
}

impl fmt::Display for RunMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stop => "0 (stopped)",
            Self::Run => "1 (running)",
            Self::Unmerge => "2 (stopped, unmerged)",
        })
    }
}

/// `advisor_mode` (Linux >= 6.9): who sets pages_to_scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdvisorMode {
    /// pages_to_scan is set by hand.
    None,
    /// The kernel adapts pages_to_scan to reach advisor_target_scan_time.
    ScanTime,
}

impl AdvisorMode {
    pub fn sysfs_value(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::ScanTime => "scan-time",
        }
    }
}

impl FromStr for AdvisorMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim() {
            "none" => Ok(Self::None),
            "scan-time" => Ok(Self::ScanTime),
            _ => Err(()),
        }
    }
}

impl fmt::Display for AdvisorMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.sysfs_value())
    }
}

pub(crate) fn bool_value(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}
