//! The API's view of a running VM: its configuration, the shared
//! `VmControl`, guest RAM (for madvise) and the statistics sampler.
//!
//! Nothing here is locked by a vCPU thread except `VmControl`'s own short
//! critical sections (pause flag, thread list), so the API can never stall
//! the guest; the sampler and KSM locks are the API's alone.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::memory;
use crate::stats::{Sampler, VmStats};
use crate::vcpu::{ExitOutcome, VmControl};

use super::backend::{BackendError, StatsSource, VmBackend};
use super::types::{Action, BalloonInfo, OnOff, VmInfo, VmState};
use crate::devices::virtio::BalloonHandle;

/// How old the smaps-derived figures (Pss, swap, overhead) of `/stats` may
/// be; residency and KSM counters are read on every request (docs/stats.md).
pub const STATS_DETAIL_MAX_AGE: Duration = Duration::from_secs(2);

/// The stats module's sampler; sampling is serialised (it reuses buffers).
impl StatsSource for Mutex<Sampler> {
    fn sample(&self) -> Result<VmStats, BackendError> {
        lock(self)
            .sample_fresh(STATS_DETAIL_MAX_AGE)
            .map_err(|e| BackendError::Stats(e.to_string()))
    }
}

struct Unavailable(String);

impl StatsSource for Unavailable {
    fn sample(&self) -> Result<VmStats, BackendError> {
        Err(BackendError::Stats(self.0.clone()))
    }
}

pub struct LiveVm {
    name: String,
    vcpus: u32,
    mem_mib: u64,
    kernel: String,
    started: Instant,
    control: Arc<VmControl>,
    mem: GuestMemoryMmap,
    /// Whether guest RAM is MADV_MERGEABLE now; the lock also orders
    /// concurrent merge/unmerge requests.
    ksm: Mutex<bool>,
    stats: Box<dyn StatsSource>,
    balloon: Option<BalloonHandle>,
}

impl LiveVm {
    pub fn new(
        config: &VmConfig,
        control: Arc<VmControl>,
        mem: GuestMemoryMmap,
        stats: Box<dyn StatsSource>,
    ) -> Self {
        Self {
            name: config.name.clone(),
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            kernel: config.kernel.display().to_string(),
            started: Instant::now(),
            control,
            mem,
            ksm: Mutex::new(config.ksm),
            stats,
            balloon: None,
        }
    }

    /// With the stats module's sampler over this VM's guest RAM; if it
    /// cannot be set up, `/stats` answers 500 with the reason and the rest
    /// of the API still works.
    pub fn with_sampler(config: &VmConfig, control: Arc<VmControl>, mem: GuestMemoryMmap) -> Self {
        let regions = memory::host_regions(&mem)
            .into_iter()
            .map(|r| (r.host_addr, r.len));
        let stats: Box<dyn StatsSource> = match Sampler::new(regions) {
            Ok(s) => Box::new(Mutex::new(s)),
            Err(e) => {
                log::warn!("VM {}: statistics unavailable: {e}", config.name);
                Box::new(Unavailable(e.to_string()))
            }
        };
        Self::new(config, control, mem, stats)
    }

    /// Serves `/balloon` through this handle (None: the VM has no balloon).
    pub fn with_balloon(mut self, balloon: Option<BalloonHandle>) -> Self {
        self.balloon = balloon;
        self
    }

    fn set_mergeable(&self, on: bool) -> Result<(), BackendError> {
        let mut ksm = lock(&self.ksm);
        memory::set_mergeable(&self.mem, on)?;
        *ksm = on;
        Ok(())
    }
}

impl VmBackend for LiveVm {
    fn info(&self) -> VmInfo {
        VmInfo {
            name: self.name.clone(),
            state: if self.control.is_paused() {
                VmState::Paused
            } else {
                VmState::Running
            },
            pid: std::process::id(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            kernel: self.kernel.clone(),
            uptime_s: (self.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            ksm: OnOff::from(*lock(&self.ksm)),
        }
    }

    fn stats(&self) -> Result<VmStats, BackendError> {
        let mut stats = self.stats.sample()?;
        // The guest's own view of its memory joins the host's.
        stats.balloon = self.balloon.as_ref().and_then(BalloonHandle::stats);
        Ok(stats)
    }

    fn balloon(&self) -> Result<BalloonInfo, BackendError> {
        let b = self.balloon.as_ref().ok_or(BackendError::NoBalloon)?;
        let counters = b.counters();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        Ok(BalloonInfo {
            target_mib: b.target_mib(),
            actual_mib: b.actual_mib(),
            reported_bytes: load(&counters.reported_bytes),
            poisoned_report_bytes: load(&counters.poisoned_report_bytes),
            stats: b.stats(),
        })
    }

    fn set_balloon(&self, target_mib: u64) -> Result<(), BackendError> {
        let b = self.balloon.as_ref().ok_or(BackendError::NoBalloon)?;
        if self.control.stopping() {
            return Err(BackendError::Stopping);
        }
        if target_mib >= self.mem_mib {
            return Err(BackendError::BalloonTarget(format!(
                "{target_mib} MiB is not below the guest's {} MiB",
                self.mem_mib
            )));
        }
        b.set_target_mib(target_mib)
            .map_err(|e| BackendError::BalloonTarget(e.to_string()))
    }

    fn act(&self, action: Action) -> Result<(), BackendError> {
        if self.control.stopping() {
            return Err(BackendError::Stopping);
        }
        match action {
            Action::Shutdown => {
                log::info!("VM {}: shutdown requested through the API", self.name);
                self.control
                    .request_exit(ExitOutcome::Stopped("API shutdown".into()));
            }
            Action::Pause => self.control.set_paused(true),
            Action::Resume => self.control.set_paused(false),
            Action::KsmUnmerge => self.set_mergeable(false)?,
            Action::KsmMerge => self.set_mergeable(true)?,
        }
        Ok(())
    }
}
