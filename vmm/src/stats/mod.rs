//! Per-VM memory and KSM statistics, sampled inside the VMM process.
//!
//! Fields the running kernel does not provide (no `/proc/self/ksm_stat`, no
//! `KSM:` line in smaps) are `None` and reported as unavailable, never as 0.

use serde::{Deserialize, Serialize};

/// Memory figures for the guest RAM mappings only (from /proc/self/smaps), in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRamStats {
    pub rss: u64,
    pub pss: u64,
    pub anonymous: u64,
    /// `KSM:` line of smaps (Linux >= 6.1 with CONFIG_KSM): bytes of this VM's
    /// guest RAM that are merged KSM pages.
    pub ksm: Option<u64>,
    pub anon_huge_pages: u64,
    pub swap: u64,
}

/// The process-wide KSM counters (from /proc/self/ksm_stat).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmProcessStats {
    pub ksm_rmap_items: Option<u64>,
    pub ksm_merging_pages: Option<u64>,
    pub ksm_zero_pages: Option<u64>,
    /// Bytes; may be negative (rmap items cost more than merging saved).
    pub ksm_process_profit: Option<i64>,
    pub ksm_mergeable: Option<bool>,
    pub ksm_merge_any: Option<bool>,
}

/// Everything `GET /stats` reports for one VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmStats {
    /// Guest RAM configured, bytes.
    pub guest_ram_bytes: u64,
    pub guest_ram: GuestRamStats,
    pub ksm: KsmProcessStats,
    /// Whole-process RSS, bytes (from /proc/self/statm or smaps_rollup).
    pub process_rss: u64,
    /// VMM overhead: process RSS minus guest RAM Rss, bytes.
    pub vmm_overhead_bytes: u64,
    /// Merged fraction of resident guest memory (0..=1); None when the KSM line is unavailable.
    pub merged_fraction: Option<f64>,
    /// Effective cost of the VM: resident memory minus what KSM saves for it, bytes.
    pub effective_bytes: Option<u64>,
}
