//! Per-VM memory and KSM statistics, sampled inside the VMM process.
//!
//! Fields the running kernel does not provide (no `/proc/self/ksm_stat`, no
//! `KSM:` line in smaps) are `None` and reported as unavailable, never as 0.
//! The definitions of the derived figures are in docs/stats.md.

mod error;
mod ksm_stat;
mod regions;
mod sampler;
mod smaps;

use serde::{Deserialize, Serialize};

pub use error::StatsError;
pub use ksm_stat::parse_ksm_stat;
pub use regions::GuestRegions;
pub use sampler::{page_size, Sampler};
pub use smaps::{parse_smaps, SmapsAccumulator, SmapsTotals};

/// Counts as the nearest `f64`, for ratios, rates and display.
///
/// Exact up to 2^53, far above any byte, page or tick count here (8 PiB of
/// bytes); above that the rounding is harmless in a ratio or a display.
/// One place for the casts that `clippy::cast_precision_loss` would flag.
pub trait ApproxF64 {
    fn approx_f64(self) -> f64;
}

#[allow(clippy::cast_precision_loss, reason = "see ApproxF64")]
impl ApproxF64 for u64 {
    fn approx_f64(self) -> f64 {
        self as f64
    }
}

#[allow(clippy::cast_precision_loss, reason = "see ApproxF64")]
impl ApproxF64 for i64 {
    fn approx_f64(self) -> f64 {
        self as f64
    }
}

#[allow(clippy::cast_precision_loss, reason = "see ApproxF64")]
impl ApproxF64 for usize {
    fn approx_f64(self) -> f64 {
        self as f64
    }
}

/// Memory figures for the guest RAM mappings only (from /proc/self/smaps), in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRamStats {
    pub rss: u64,
    pub pss: u64,
    pub anonymous: u64,
    /// `KSM:` line of smaps (Linux >= 6.6 with CONFIG_KSM): bytes of this VM's
    /// guest RAM that are merged KSM pages.
    pub ksm: Option<u64>,
    pub anon_huge_pages: u64,
    pub swap: u64,
    /// VMAs summed (madvise and mprotect split a region into several).
    pub vmas: u32,
}

/// sizeof(struct ksm_rmap_item) on 64-bit Linux: what the kernel's own
/// profit formula charges per rmap item (mm/ksm.c).
pub const RMAP_ITEM_BYTES: u64 = 64;

/// The process-wide KSM counters (from /proc/self/ksm_stat).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmProcessStats {
    pub ksm_rmap_items: Option<u64>,
    pub ksm_merging_pages: Option<u64>,
    pub ksm_zero_pages: Option<u64>,
    /// Merged pages beyond the first copy of each KSM page (proposed for
    /// kernels after 6.18; when present the kernel's profit counts these
    /// instead of ksm_merging_pages).
    pub ksm_pages_sharing: Option<u64>,
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
    /// Whether guest RAM is marked MADV_MERGEABLE now: the VM's `ksm`
    /// setting as the `ksm_merge`/`ksm_unmerge` actions left it. None from
    /// a sampler alone, which does not know it.
    #[serde(default)]
    pub guest_ram_mergeable: Option<bool>,
    /// Whole-process RSS, bytes (from /proc/self/statm or smaps_rollup).
    pub process_rss: u64,
    /// VMM overhead: process RSS minus guest RAM Rss, bytes.
    pub vmm_overhead_bytes: u64,
    /// Merged fraction of resident guest memory (0..=1); None when the KSM line is unavailable.
    pub merged_fraction: Option<f64>,
    /// Host memory the guest RAM really costs: guest Pss (KSM pages divided
    /// among everything mapping them) plus the kernel's KSM metadata for
    /// this process, bytes. None when the metadata is unknown.
    pub effective_bytes: Option<u64>,
    /// What KSM saves for this VM net of its metadata, bytes:
    /// (Rss - Pss) + zero-page merges - metadata. May be negative.
    pub ksm_saved_bytes: Option<i64>,
    /// KSM's rmap items for this process, bytes (derived from ksm_stat).
    pub ksm_metadata_bytes: Option<u64>,
    /// Age of the smaps-derived figures (Pss, swap, huge pages, overhead) in
    /// a cheap sample; Rss and the KSM counters are always fresh.
    #[serde(default)]
    pub detail_age_ms: Option<u64>,
    /// The guest's latest memory statistics from the balloon's stats queue.
    #[serde(default)]
    pub balloon: Option<crate::devices::virtio::BalloonStats>,
    /// Every virtio device's counters (requests, bytes, throttled time).
    #[serde(default)]
    pub devices: Vec<crate::devices::virtio::DeviceCounters>,
    /// The serial port's output: bytes written, dropped by its rate limit,
    /// file rotations.
    #[serde(default)]
    pub serial: Option<crate::devices::serial::SerialCounters>,
}

impl KsmProcessStats {
    /// The metadata KSM spends on this process, recovered from the kernel's
    /// profit formula: (merged + zero pages) x page size - profit. Kernels
    /// without ksm_process_profit (Linux 6.1) give the rmap item count,
    /// which costs RMAP_ITEM_BYTES each.
    pub fn metadata_bytes(&self, page_size: u64) -> Option<u64> {
        if self.ksm_process_profit.is_none() {
            return self.ksm_rmap_items?.checked_mul(RMAP_ITEM_BYTES);
        }
        let merged = self.ksm_pages_sharing.or(self.ksm_merging_pages)?;
        // Kernels without per-process zero-page counts leave them out of profit too.
        let zero = self.ksm_zero_pages.unwrap_or(0);
        let counted = merged.checked_add(zero)?.checked_mul(page_size)?;
        let profit = self.ksm_process_profit?;
        // Saturating at 0 (and, were the profit hugely negative, at u64::MAX).
        let diff = (i128::from(counted) - i128::from(profit)).max(0);
        Some(u64::try_from(diff).unwrap_or(u64::MAX))
    }
}

impl VmStats {
    /// Combines the raw figures into the derived ones.
    ///
    /// `ksm_built_in`: whether the kernel has KSM at all; without it the
    /// missing ksm_stat means "nothing merged, no metadata" rather than
    /// "unknown".
    pub fn derive(
        guest_ram_bytes: u64,
        guest_ram: GuestRamStats,
        ksm: KsmProcessStats,
        process_rss: u64,
        page_size: u64,
        ksm_built_in: bool,
    ) -> Self {
        let merged_fraction = guest_ram.ksm.map(|k| {
            if guest_ram.rss == 0 {
                0.0
            } else {
                k.approx_f64() / guest_ram.rss.approx_f64()
            }
        });
        let (metadata, zero_bytes) = if ksm_built_in {
            (
                ksm.metadata_bytes(page_size),
                (ksm.ksm_process_profit.is_some() || ksm.ksm_rmap_items.is_some())
                    .then(|| ksm.ksm_zero_pages.unwrap_or(0).saturating_mul(page_size)),
            )
        } else {
            (Some(0), Some(0))
        };
        let shared = guest_ram.rss.saturating_sub(guest_ram.pss);
        let ksm_saved_bytes = match (metadata, zero_bytes) {
            (Some(m), Some(z)) => {
                let saved = i128::from(shared) + i128::from(z) - i128::from(m);
                // Clamped to the range of an i64.
                Some(i64::try_from(saved).unwrap_or(if saved < 0 { i64::MIN } else { i64::MAX }))
            }
            _ => None,
        };
        Self {
            guest_ram_bytes,
            vmm_overhead_bytes: process_rss.saturating_sub(guest_ram.rss),
            effective_bytes: metadata.map(|m| guest_ram.pss.saturating_add(m)),
            merged_fraction,
            ksm_saved_bytes,
            ksm_metadata_bytes: metadata,
            guest_ram,
            ksm,
            guest_ram_mergeable: None,
            process_rss,
            detail_age_ms: None,
            balloon: None,
            devices: Vec::new(),
            serial: None,
        }
    }
}

#[cfg(test)]
mod tests;
