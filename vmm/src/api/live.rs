//! The API served from a running VM: [`VmBackend`] for the core's
//! [`VmHandle`]. The API only translates; the VM's state lives in the
//! handle, shared with the supervisor and the main loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::devices::virtio::{Balloon, BalloonHandle, BALLOON_ID};
use crate::stats::VmStats;
use crate::vm::{VmHandle, VmHandleError};

use super::backend::{BackendError, VmBackend};
use super::types::{Action, BalloonInfo, VmInfo};

/// How old the smaps-derived figures (Pss, swap, overhead) of `/stats` may
/// be; residency and KSM counters are read on every request (docs/stats.md).
pub const STATS_DETAIL_MAX_AGE: Duration = Duration::from_secs(2);

impl From<VmHandleError> for BackendError {
    fn from(e: VmHandleError) -> Self {
        match e {
            VmHandleError::Stopping => BackendError::Stopping,
            VmHandleError::Memory(e) => BackendError::Memory(e),
            VmHandleError::Stats(why) => BackendError::Stats(why),
            e @ (VmHandleError::Vcpu(_) | VmHandleError::Device(_)) => {
                BackendError::Vm(e.to_string())
            }
        }
    }
}

/// The balloon, if the VM has one.
fn balloon(vm: &VmHandle) -> Option<BalloonHandle> {
    vm.with_device::<Balloon, _>(BALLOON_ID, |b| b.handle())
        .ok()
}

impl VmBackend for VmHandle {
    fn info(&self) -> VmInfo {
        VmHandle::info(self)
    }

    fn stats(&self) -> Result<VmStats, BackendError> {
        let mut stats = self.sample(STATS_DETAIL_MAX_AGE)?;
        // The guest's own view of its memory joins the host's.
        stats.balloon = balloon(self).and_then(|b| b.stats());
        stats.devices = self.device_counters();
        stats.serial = Some(self.serial_counters());
        Ok(stats)
    }

    fn balloon(&self) -> Result<BalloonInfo, BackendError> {
        let b = balloon(self).ok_or(BackendError::NoBalloon)?;
        let counters = b.counters();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Ok(BalloonInfo {
            target_mib: b.target_mib(),
            actual_mib: b.actual_mib(),
            reported_bytes: load(&counters.reported_bytes),
            poisoned_report_bytes: load(&counters.poisoned_report_bytes),
            stats: b.stats(),
        })
    }

    fn set_balloon(&self, target_mib: u64) -> Result<(), BackendError> {
        let b = balloon(self).ok_or(BackendError::NoBalloon)?;
        if self.stopping() {
            return Err(BackendError::Stopping);
        }
        let mem_mib = self.identity().mem_mib;
        if target_mib >= mem_mib {
            return Err(BackendError::BalloonTarget(format!(
                "{target_mib} MiB is not below the guest's {mem_mib} MiB"
            )));
        }
        b.set_target_mib(target_mib)
            .map_err(|e| BackendError::BalloonTarget(e.to_string()))
    }

    fn act(&self, action: Action) -> Result<(), BackendError> {
        if self.stopping() {
            return Err(BackendError::Stopping);
        }
        match action {
            Action::Shutdown => {
                log::info!("VM {}: shutdown requested through the API", self.name());
                self.stop("API shutdown");
            }
            Action::Pause => self.pause()?,
            Action::Resume => self.resume()?,
            Action::KsmUnmerge => self.set_mergeable(false)?,
            Action::KsmMerge => self.set_mergeable(true)?,
        }
        Ok(())
    }
}
