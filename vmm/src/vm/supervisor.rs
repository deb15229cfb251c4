//! Whoever supervises the VMM (systemd, see `service`): the main loop
//! reports to it and runs its periodic work.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::VmHandle;

/// Every method has a no-op default.
pub trait Supervisor {
    /// The vCPUs are running; `vm` is the running VM (its live figures and
    /// settings, the same ones the API serves).
    fn started(&mut self, _vm: &Arc<VmHandle>) {}
    /// Readable (an eventfd) once the guest has said it is up.
    fn guest_ready_fd(&self) -> Option<RawFd> {
        None
    }
    /// `guest_ready_fd` became readable.
    fn guest_ready(&mut self) {}
    /// When `tick` wants to run next.
    fn next_tick(&self) -> Option<Instant> {
        None
    }
    /// Runs after every wake-up of the main loop.
    fn tick(&mut self, _now: Instant) {}
    /// The VM is being stopped: the guest has `timeout` to shut down (zero:
    /// it is stopped at once).
    fn stopping(&mut self, _timeout: Duration) {}
    /// The main loop has ended and the VM is being torn down (vCPUs joined,
    /// disks flushed: bounded, about a second): the last word before exit.
    fn finishing(&mut self) {}
}

/// For a VMM nobody supervises.
#[derive(Debug)]
pub struct NoSupervisor;
impl Supervisor for NoSupervisor {}
