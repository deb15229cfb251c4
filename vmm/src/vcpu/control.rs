//! What every part of a running VM may ask of it: stop (with the reason
//! that wins), a stop deadline after a guest panic, and events broadcast to
//! the vCPU threads. The ACPI devices use it from vCPU threads, the API and
//! the main loop from theirs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::handle::{kick, VcpuEvent};
use crate::devices::bus::lock;
use crate::outcome::ExitOutcome;

/// How long a guest that reported a panic may run on (to flush its console
/// and reboot) before the VMM stops it.
pub const PANIC_GRACE: Duration = Duration::from_secs(5);

/// A running vCPU thread as the control sees it: where its events go and
/// which thread to kick out of KVM_RUN.
pub(crate) struct VcpuLink {
    pub events: Sender<VcpuEvent>,
    pub thread: libc::pthread_t,
}

/// State shared by the vCPU threads and whoever controls the VM.
pub struct VmControl {
    stop: AtomicBool,
    outcome: Mutex<Option<ExitOutcome>>,
    /// When the main loop stops a VM whose guest panicked but did not reset.
    stop_deadline: Mutex<Option<Instant>>,
    /// Written when the VM should stop (or a stop deadline was set); the
    /// main loop waits on it.
    pub exit_evt: EventFd,
    /// The running vCPUs; emptied before their threads are joined, so that
    /// no kick ever reaches a thread id that is gone.
    vcpus: Mutex<Vec<VcpuLink>>,
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmControl")
            .field("stopping", &self.stopping())
            .field("outcome", &self.outcome())
            .finish_non_exhaustive()
    }
}

impl VmControl {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            stop_deadline: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            vcpus: Mutex::new(Vec::new()),
        }))
    }

    /// Records `outcome` unless one is recorded already (the first wins).
    fn record(&self, outcome: ExitOutcome) {
        let mut o = lock(&self.outcome);
        if o.is_none() {
            *o = Some(outcome);
        }
    }

    /// Records why the VM stops (the first reason wins) and stops every vCPU.
    pub fn request_exit(&self, outcome: ExitOutcome) {
        self.record(outcome);
        self.stop.store(true, Ordering::SeqCst);
        // Paused vCPUs wait for an event; running ones see the stop flag
        // once kicked out of KVM_RUN.
        self.broadcast(VcpuEvent::Exit);
        if let Err(e) = self.exit_evt.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }

    /// The guest kernel says it panicked (pvpanic). Linux does that from a
    /// panic notifier, before it flushes the console and before it reboots
    /// (panic=N) or hangs (panic=0): the VM runs on for `PANIC_GRACE` so the
    /// panic message reaches the serial log, and ends at the reset that
    /// usually follows, still as a panic.
    pub fn guest_panicked(&self) {
        self.record(ExitOutcome::GuestPanic);
        let mut d = lock(&self.stop_deadline);
        if d.is_none() {
            *d = Some(Instant::now() + PANIC_GRACE);
        }
        drop(d);
        if let Err(e) = self.exit_evt.write(1) {
            log::error!("cannot wake the VMM main loop: {e}");
        }
    }

    /// When the main loop must stop the VM even if the guest does not.
    pub fn stop_deadline(&self) -> Option<Instant> {
        *lock(&self.stop_deadline)
    }

    pub fn outcome(&self) -> Option<ExitOutcome> {
        lock(&self.outcome).clone()
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(crate) fn attach(&self, link: VcpuLink) {
        lock(&self.vcpus).push(link);
    }

    /// Sends `event` to every running vCPU and kicks it out of KVM_RUN so
    /// that it sees the event; returns how many vCPUs it reached.
    pub(crate) fn broadcast(&self, event: VcpuEvent) -> usize {
        let vcpus = lock(&self.vcpus);
        let mut reached = 0;
        for v in vcpus.iter() {
            if v.events.send(event).is_ok() {
                reached += 1;
            }
            // With the list locked: the thread has not been joined yet.
            kick(v.thread);
        }
        reached
    }

    /// Forgets the vCPU threads before they are joined (they have stopped
    /// or are about to); later broadcasts reach nobody.
    pub(crate) fn detach_all(&self) {
        lock(&self.vcpus).clear();
    }
}
