//! [`VmHandle`]: the one owner of a running VM's shared state, handed to
//! the API, the systemd supervisor and the main loop alike. Through it:
//! the vCPUs (pause/resume answered by every vCPU thread), the devices by
//! id, guest RAM and its live merge setting, and one statistics sampler.
//!
//! Nothing here is locked by a vCPU thread except `VmControl`'s own short
//! critical sections, so no caller can stall the guest; the device lock
//! taken by `with_device` is the one the device's own work takes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use super::info::{VmInfo, VmState};
use crate::config::OnOff;
use crate::devices::bus::lock;
use crate::devices::serial::{SerialCounters, SerialStats};
use crate::devices::virtio::{DeviceId, DeviceInfo, DeviceLookupError, Devices, VirtioDevice};
use crate::memory::{self, MemoryError};
use crate::outcome::ExitOutcome;
use crate::stats::{Sampler, VmStats};
use crate::vcpu::{VcpuEvent, VcpuHandle, VcpuHandleError, VcpuResponse, VmControl};

/// How long every vCPU has to answer a pause or resume: a kicked vCPU
/// leaves KVM_RUN at once, so only a wedged host takes this long.
pub const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmHandleError {
    #[error("the VM is shutting down")]
    Stopping,
    #[error(transparent)]
    Vcpu(#[from] VcpuHandleError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot sample statistics: {0}")]
    Stats(String),
    #[error(transparent)]
    Device(#[from] DeviceLookupError),
}

/// What the VM was started as (for `info` and logs).
#[derive(Debug, Clone)]
pub struct VmIdentity {
    pub name: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub kernel: PathBuf,
}

pub struct VmHandle {
    identity: VmIdentity,
    started: Instant,
    control: Arc<VmControl>,
    mem: GuestMemoryMmap,
    /// The vCPU threads; the lock also orders concurrent pause/resume
    /// requests, and the main loop takes them out to join them.
    vcpus: Mutex<Vec<VcpuHandle>>,
    paused: AtomicBool,
    /// Whether guest RAM is MADV_MERGEABLE now: read without a lock, so
    /// that `GET /` and `/stats` never wait behind a long madvise.
    mergeable: AtomicBool,
    /// Orders concurrent merge/unmerge requests.
    merge_change: Mutex<()>,
    /// None with the reason when sampling cannot work on this host.
    pub(super) sampler: Result<Mutex<Sampler>, String>,
    devices: Devices,
    /// The serial port's output counters (read without its lock).
    serial: Arc<SerialStats>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("identity", &self.identity)
            .field("paused", &self.is_paused())
            .field("mergeable", &self.mergeable())
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl VmHandle {
    pub(crate) fn new(
        identity: VmIdentity,
        control: Arc<VmControl>,
        mem: GuestMemoryMmap,
        mergeable: bool,
        vcpus: Vec<VcpuHandle>,
        devices: Devices,
        serial: Arc<SerialStats>,
    ) -> Self {
        let regions = memory::host_regions(&mem)
            .into_iter()
            .map(|r| (r.host_addr, r.len));
        let sampler = Sampler::new(regions).map(Mutex::new).map_err(|e| {
            log::warn!("VM {}: statistics unavailable: {e}", identity.name);
            e.to_string()
        });
        Self {
            identity,
            started: Instant::now(),
            control,
            mem,
            vcpus: Mutex::new(vcpus),
            paused: AtomicBool::new(false),
            mergeable: AtomicBool::new(mergeable),
            merge_change: Mutex::new(()),
            sampler,
            devices,
            serial,
        }
    }

    /// A VM without vCPUs or devices over `mem_mib` MiB of fresh guest
    /// RAM: the handle's own logic (merge setting, sampling) without KVM.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, mem_mib: u64, mergeable: bool) -> Self {
        let mem = memory::create(mem_mib << 20).expect("guest RAM for a test");
        if mergeable {
            memory::set_mergeable(&mem, true).expect("madvise for a test");
        }
        let identity = VmIdentity {
            name: name.into(),
            vcpus: 0,
            mem_mib,
            kernel: PathBuf::from("/nonexistent/vmlinux"),
        };
        let control = VmControl::new().expect("eventfd for a test");
        Self::new(
            identity,
            control,
            mem,
            mergeable,
            Vec::new(),
            Devices::default(),
            Arc::default(),
        )
    }

    /// What the VM is now (`GET /`, `ksmvm list`, the metrics).
    pub fn info(&self) -> VmInfo {
        let id = &self.identity;
        VmInfo {
            name: id.name.clone(),
            state: if self.is_paused() {
                VmState::Paused
            } else {
                VmState::Running
            },
            pid: std::process::id(),
            vcpus: id.vcpus,
            mem_mib: id.mem_mib,
            kernel: id.kernel.display().to_string(),
            uptime_s: (self.uptime().as_secs_f64() * 1000.0).round() / 1000.0,
            ksm: OnOff::from(self.mergeable()),
        }
    }

    pub fn identity(&self) -> &VmIdentity {
        &self.identity
    }

    pub fn name(&self) -> &str {
        &self.identity.name
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        memory::host_regions(&self.mem).iter().map(|r| r.len).sum()
    }

    pub fn stopping(&self) -> bool {
        self.control.stopping()
    }

    /// Stops the VM at once (no guest shutdown), recording `why`.
    pub fn stop(&self, why: &str) {
        self.control.request_exit(ExitOutcome::Stopped(why.into()));
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Returns once every vCPU has stopped running guest code. If one does
    /// not answer, the others are resumed and the VM keeps running.
    pub fn pause(&self) -> Result<(), VmHandleError> {
        let vcpus = lock(&self.vcpus);
        if self.stopping() {
            return Err(VmHandleError::Stopping);
        }
        if let Err(e) = self.ask(&vcpus, VcpuEvent::Pause, VcpuResponse::Paused) {
            let _ = self.ask(&vcpus, VcpuEvent::Resume, VcpuResponse::Resumed);
            return Err(self.stopping_or(e));
        }
        self.paused.store(true, Ordering::SeqCst);
        log::info!("VM {}: paused", self.name());
        Ok(())
    }

    /// Returns once every vCPU runs guest code again.
    pub fn resume(&self) -> Result<(), VmHandleError> {
        let vcpus = lock(&self.vcpus);
        if self.stopping() {
            return Err(VmHandleError::Stopping);
        }
        self.ask(&vcpus, VcpuEvent::Resume, VcpuResponse::Resumed)
            .map_err(|e| self.stopping_or(e))?;
        self.paused.store(false, Ordering::SeqCst);
        log::info!("VM {}: resumed", self.name());
        Ok(())
    }

    fn ask(
        &self,
        vcpus: &[VcpuHandle],
        event: VcpuEvent,
        want: VcpuResponse,
    ) -> Result<(), VcpuHandleError> {
        for v in vcpus {
            v.discard_stale();
        }
        self.control.broadcast(event);
        let deadline = Instant::now() + VCPU_ANSWER_TIMEOUT;
        for v in vcpus {
            v.expect(want, deadline.saturating_duration_since(Instant::now()))?;
        }
        Ok(())
    }

    /// A vCPU that is gone because the VM stops is a stop, not a fault.
    fn stopping_or(&self, e: VcpuHandleError) -> VmHandleError {
        if self.stopping() {
            VmHandleError::Stopping
        } else {
            VmHandleError::Vcpu(e)
        }
    }

    /// Takes the vCPU threads out for joining (the main loop, once the VM
    /// stops); pause and resume then reach no vCPU.
    pub(crate) fn take_vcpus(&self) -> Vec<VcpuHandle> {
        std::mem::take(&mut *lock(&self.vcpus))
    }

    /// Whether guest RAM is MADV_MERGEABLE now.
    pub fn mergeable(&self) -> bool {
        self.mergeable.load(Ordering::SeqCst)
    }

    /// Marks guest RAM mergeable (KSM may merge it) or not (KSM unmerges
    /// what it merged, which may take a while on a large guest).
    pub fn set_mergeable(&self, on: bool) -> Result<(), VmHandleError> {
        if self.stopping() {
            return Err(VmHandleError::Stopping);
        }
        let _order = lock(&self.merge_change);
        memory::set_mergeable(&self.mem, on)?;
        self.mergeable.store(on, Ordering::SeqCst);
        log::info!(
            "VM {}: guest RAM {}",
            self.name(),
            if on {
                "mergeable"
            } else {
                "no longer mergeable"
            }
        );
        Ok(())
    }

    /// This VM's memory figures; the smaps-derived ones (Pss, swap,
    /// overhead) may be up to `detail_max_age` old (docs/stats.md).
    pub fn sample(&self, detail_max_age: Duration) -> Result<VmStats, VmHandleError> {
        let sampler = self
            .sampler
            .as_ref()
            .map_err(|e| VmHandleError::Stats(e.clone()))?;
        lock(sampler)
            .sample_fresh(detail_max_age)
            .map(|s| self.with_merge_setting(s))
            .map_err(|e| VmHandleError::Stats(e.to_string()))
    }

    /// The live merge setting joins the sampler's figures, which cannot
    /// know it (ksm_stat's `ksm_mergeable` covers the whole process).
    fn with_merge_setting(&self, mut stats: VmStats) -> VmStats {
        stats.guest_ram_mergeable = Some(self.mergeable());
        stats
    }

    /// Like [`sample`](Self::sample), but None at once if another thread
    /// is sampling: for the main loop, which must not wait behind an API
    /// request's smaps pass.
    pub fn try_sample(&self, detail_max_age: Duration) -> Option<Result<VmStats, VmHandleError>> {
        let sampler = match self.sampler.as_ref() {
            Ok(s) => s,
            Err(e) => return Some(Err(VmHandleError::Stats(e.clone()))),
        };
        let mut guard = match sampler.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => return None,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        Some(
            guard
                .sample_fresh(detail_max_age)
                .map(|s| self.with_merge_setting(s))
                .map_err(|e| VmHandleError::Stats(e.to_string())),
        )
    }

    /// The virtio devices, in the order the guest sees them.
    pub fn devices(&self) -> impl Iterator<Item = (&DeviceId, &DeviceInfo)> {
        self.devices.iter()
    }

    /// The serial port's output counters, for `/stats`.
    pub fn serial_counters(&self) -> SerialCounters {
        self.serial.counters()
    }

    /// Every device's counters, for `/stats`.
    pub fn device_counters(&self) -> Vec<crate::devices::virtio::DeviceCounters> {
        self.devices.counters()
    }

    /// Runs `f` on device `id`, which must be a `T`, under the device's lock.
    pub fn with_device<T: VirtioDevice, R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R, VmHandleError> {
        Ok(self.devices.with_device(id, f)?)
    }
}
