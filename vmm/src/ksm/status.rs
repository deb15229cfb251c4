//! Read-only KSM counters and the combined status snapshot.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::settings::KsmSettings;
use super::sysfs::read_parsed;
use super::KsmError;

/// Counters ksmd maintains. `None`: this kernel has no such file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmCounters {
    /// KSM pages in use (one physical page each).
    pub pages_shared: Option<u64>,
    /// Page-table mappings merged into those pages beyond the first: pages saved.
    pub pages_sharing: Option<u64>,
    pub pages_unshared: Option<u64>,
    pub pages_volatile: Option<u64>,
    pub pages_skipped: Option<u64>,
    pub pages_scanned: Option<u64>,
    pub full_scans: Option<u64>,
    /// Bytes saved host-wide minus rmap metadata; may be negative.
    pub general_profit: Option<i64>,
    /// Pages merged with the zero page (use_zero_pages=1).
    pub ksm_zero_pages: Option<u64>,
    pub stable_node_chains: Option<u64>,
    pub stable_node_dups: Option<u64>,
}

impl KsmCounters {
    pub(crate) fn read(root: &Path) -> Result<Self, KsmError> {
        Ok(Self {
            pages_shared: read_parsed(root, "pages_shared")?,
            pages_sharing: read_parsed(root, "pages_sharing")?,
            pages_unshared: read_parsed(root, "pages_unshared")?,
            pages_volatile: read_parsed(root, "pages_volatile")?,
            pages_skipped: read_parsed(root, "pages_skipped")?,
            pages_scanned: read_parsed(root, "pages_scanned")?,
            full_scans: read_parsed(root, "full_scans")?,
            general_profit: read_parsed(root, "general_profit")?,
            ksm_zero_pages: read_parsed(root, "ksm_zero_pages")?,
            stable_node_chains: read_parsed(root, "stable_node_chains")?,
            stable_node_dups: read_parsed(root, "stable_node_dups")?,
        })
    }
}

/// Everything `/sys/kernel/mm/ksm` shows at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmStatus {
    pub counters: KsmCounters,
    pub settings: KsmSettings,
}
