//! Time series of one run: host memory, KSM counters and ksmd CPU (host
//! rows) and every guest's `VmStats` (VM rows), relative to a baseline
//! taken before the first guest started.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use ksmvm::ksm::{Ksm, KsmCounters};
use ksmvm::stats::VmStats;
use serde::Serialize;

use crate::cancel;
use crate::convergence::{Convergence, MIN_SCANS};
use crate::fleet::Fleet;
use crate::host::{diff_i64, mib, mib_i, MemInfo, PAGE_SIZE_I64};
use crate::ksmd::KsmdMeter;
use crate::vmstats::VmStatsSource;

/// Host state before the run; everything is reported relative to it,
/// because other processes on the host use memory and KSM too.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Baseline {
    pub mem_used: u64,
    pub mem_available: u64,
    pub mem_total: u64,
    pub swap_used: u64,
    pub pages_sharing: u64,
    pub pages_shared: u64,
    pub ksm_zero_pages: u64,
}

impl Baseline {
    pub fn take(ksm: &Ksm) -> Result<Self> {
        let m = MemInfo::read()?;
        let c = ksm.counters().unwrap_or_default();
        Ok(Self {
            mem_used: m.used(),
            mem_available: m.available,
            mem_total: m.total,
            swap_used: m.swap_used(),
            pages_sharing: c.pages_sharing.unwrap_or(0),
            pages_shared: c.pages_shared.unwrap_or(0),
            ksm_zero_pages: c.ksm_zero_pages.unwrap_or(0),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HostSample {
    pub t_s: f64,
    /// Label of the phase (e.g. "ksm-on n=8").
    pub phase: String,
    pub guests: usize,
    pub mem_available_mib: f64,
    /// MemTotal - MemAvailable minus the baseline's.
    pub host_used_mib: f64,
    /// Growth of pages_sharing since the baseline: pages KSM saves for the run.
    pub pages_sharing: i64,
    pub pages_shared: i64,
    pub ksm_zero_pages: i64,
    /// (pages_sharing + ksm_zero_pages growth) x 4 KiB.
    pub saved_mib: f64,
    pub full_scans: u64,
    pub general_profit_mib: Option<f64>,
    pub ksmd_cpu_pct: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmSample {
    pub t_s: f64,
    pub phase: String,
    pub vm: String,
    pub pid: u32,
    pub rss_mib: f64,
    pub pss_mib: f64,
    pub ksm_mib: Option<f64>,
    pub merged_fraction: Option<f64>,
    pub ksm_merging_pages: Option<u64>,
    pub ksm_process_profit_mib: Option<f64>,
    pub ksm_saved_mib: Option<f64>,
    pub effective_mib: Option<f64>,
    pub vmm_overhead_mib: f64,
}

impl VmSample {
    pub fn new(t_s: f64, phase: &str, vm: &str, pid: u32, s: &VmStats) -> Self {
        Self {
            t_s,
            phase: phase.to_string(),
            vm: vm.to_string(),
            pid,
            rss_mib: mib(s.guest_ram.rss),
            pss_mib: mib(s.guest_ram.pss),
            ksm_mib: s.guest_ram.ksm.map(mib),
            merged_fraction: s.merged_fraction,
            ksm_merging_pages: s.ksm.ksm_merging_pages,
            ksm_process_profit_mib: s.ksm.ksm_process_profit.map(mib_i),
            ksm_saved_mib: s.ksm_saved_bytes.map(mib_i),
            effective_mib: s.effective_bytes.map(mib),
            vmm_overhead_mib: mib(s.vmm_overhead_bytes),
        }
    }
}

/// Swap growth (bytes) that counts as "the host swaps" and stops a run.
const SWAP_GROWTH_LIMIT: u64 = 64 << 20;

/// What stops waiting early because the host runs short of memory.
#[derive(Debug, Clone, Copy)]
pub struct MemoryFloor {
    /// MemAvailable below this aborts the run (bytes).
    pub emergency_available: u64,
}

#[derive(Debug)]
pub struct Monitor {
    pub t0: Instant,
    pub baseline: Baseline,
    ksm: Ksm,
    ksmd: KsmdMeter,
    sources: HashMap<u32, VmStatsSource>,
    pub phase: String,
    pub host: Vec<HostSample>,
    pub vms: Vec<VmSample>,
    pub floor: Option<MemoryFloor>,
}

impl Monitor {
    pub fn new(ksm: Ksm) -> Result<Self> {
        let baseline = Baseline::take(&ksm)?;
        Ok(Self {
            t0: Instant::now(),
            baseline,
            ksm,
            ksmd: KsmdMeter::new(),
            sources: HashMap::new(),
            phase: String::new(),
            host: Vec::new(),
            vms: Vec::new(),
            floor: None,
        })
    }

    pub fn elapsed(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// ksmd's CPU seconds so far (None without a visible ksmd).
    pub fn ksmd_cpu_seconds(&self) -> Option<f64> {
        self.ksmd.cpu_seconds()
    }

    pub fn counters(&self) -> KsmCounters {
        self.ksm.counters().unwrap_or_default()
    }

    /// One host row (and, with `vms`, one row per guest).
    pub fn sample(&mut self, fleet: &Fleet, vms: bool) -> Result<HostSample> {
        let t = self.elapsed();
        let m = MemInfo::read()?;
        if let Some(floor) = self.floor {
            if m.available < floor.emergency_available {
                bail!(
                    "host MemAvailable fell to {:.0} MiB, below the safety floor of {:.0} MiB: \
                     stopping before the host swaps or OOM-kills",
                    mib(m.available),
                    mib(floor.emergency_available)
                );
            }
        }
        let swapped = m.swap_used().saturating_sub(self.baseline.swap_used);
        if self.floor.is_some() && swapped > SWAP_GROWTH_LIMIT {
            bail!(
                "the host started swapping ({:.0} MiB more swap in use than at the start): stopping",
                mib(swapped)
            );
        }
        let c = self.counters();
        let b = &self.baseline;
        let grow = |v: Option<u64>, base: u64| diff_i64(v.unwrap_or(0), base);
        let pages_sharing = grow(c.pages_sharing, b.pages_sharing);
        let ksm_zero_pages = grow(c.ksm_zero_pages, b.ksm_zero_pages);
        let s = HostSample {
            t_s: t,
            phase: self.phase.clone(),
            guests: fleet.len(),
            mem_available_mib: mib(m.available),
            host_used_mib: mib_i(diff_i64(m.used(), b.mem_used)),
            pages_sharing,
            pages_shared: grow(c.pages_shared, b.pages_shared),
            ksm_zero_pages,
            saved_mib: mib_i((pages_sharing + ksm_zero_pages) * PAGE_SIZE_I64),
            full_scans: c.full_scans.unwrap_or(0),
            general_profit_mib: c.general_profit.map(mib_i),
            ksmd_cpu_pct: self.ksmd.sample(),
        };
        self.host.push(s.clone());
        if vms {
            for (name, pid, stats) in self.vm_stats(fleet)? {
                self.vms
                    .push(VmSample::new(t, &self.phase, &name, pid, &stats));
            }
        }
        Ok(s)
    }

    /// Current `VmStats` of every guest.
    pub fn vm_stats(&mut self, fleet: &Fleet) -> Result<Vec<(String, u32, VmStats)>> {
        let mut out = Vec::with_capacity(fleet.len());
        let live: Vec<u32> = fleet.guests().iter().map(|g| g.pid()).collect();
        self.sources.retain(|pid, _| live.contains(pid));
        for g in fleet.guests() {
            let pid = g.pid();
            let src = match self.sources.entry(pid) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(VmStatsSource::for_ksmvm(
                    pid,
                    g.mem_mib,
                    g.api_socket.as_deref(),
                )?),
            };
            let stats = match src.sample() {
                Ok(s) => s,
                // The API failing must not end a long run while the VMM
                // lives: the same figures come from /proc.
                Err(e) if matches!(src, VmStatsSource::Api(_)) => {
                    eprintln!("{}: {e:#}; reading its /proc files instead", g.name);
                    let mut fallback = VmStatsSource::from_proc(pid, g.mem_mib)
                        .with_context(|| format!("{} (pid {pid}) after {e:#}", g.name))?;
                    let s = fallback.sample()?;
                    *src = fallback;
                    s
                }
                Err(e) => return Err(e.context(format!("{} (pid {pid})", g.name))),
            };
            out.push((g.name.clone(), pid, stats));
        }
        Ok(out)
    }

    /// What the guests cost the host, bytes: the sum over VMs of guest RAM
    /// Pss + KSM metadata (`effective_bytes`; Pss where unknown) + VMM
    /// overhead. Unlike MemAvailable, other processes do not move it.
    pub fn guests_cost(&mut self, fleet: &Fleet) -> Result<u64> {
        Ok(self
            .vm_stats(fleet)?
            .iter()
            .map(|(_, _, s)| s.effective_bytes.unwrap_or(s.guest_ram.pss) + s.vmm_overhead_bytes)
            .sum())
    }

    /// Samples every `interval` until KSM converges (see [`Convergence`]);
    /// returns the seconds it took, or None on timeout.
    pub fn wait_converged(
        &mut self,
        fleet: &mut Fleet,
        interval: Duration,
        timeout: Duration,
        vms: bool,
        bar: &ProgressBar,
    ) -> Result<Option<f64>> {
        let start = self.elapsed();
        let mut conv = Convergence::new(self.counters().full_scans.unwrap_or(0), MIN_SCANS);
        loop {
            fleet.check_alive()?;
            let s = self.sample(fleet, vms)?;
            bar.set_message(format!(
                "{}: {} guests, saved {:.0} MiB, full scans {}, ksmd {:.0}%",
                self.phase,
                s.guests,
                s.saved_mib,
                conv.scans(),
                s.ksmd_cpu_pct.unwrap_or(0.0)
            ));
            bar.tick();
            // A drop below the baseline counts as none.
            let sharing = u64::try_from(s.pages_sharing).unwrap_or(0);
            if conv.observe(s.t_s - start, s.full_scans, sharing) {
                return Ok(conv.converged_at());
            }
            if s.t_s - start >= timeout.as_secs_f64() {
                return Ok(None);
            }
            cancel::sleep(interval)?;
        }
    }
}
