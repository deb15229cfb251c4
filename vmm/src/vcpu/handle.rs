//! A running vCPU seen from outside its thread: events go in over a
//! channel (the thread is kicked out of KVM_RUN to read them) and the
//! thread answers each one it acts on, so that "paused" means every vCPU
//! has stopped running guest code, not that a flag was set.

use std::cell::Cell;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;

/// What a vCPU thread is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Stop running guest code until `Resume` (answers `Paused`).
    Pause,
    /// Run again (answers `Resumed`).
    Resume,
    /// Leave the run loop for good (no answer: the thread ends).
    Exit,
}

/// A vCPU thread's answer to an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuResponse {
    Paused,
    Resumed,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VcpuHandleError {
    #[error("vCPU {index} did not answer within {} ms", timeout.as_millis())]
    Timeout { index: u32, timeout: Duration },
    #[error("vCPU {index} has stopped")]
    Gone { index: u32 },
    #[error("vCPU {index} answered {got:?} instead of {want:?}")]
    Unexpected {
        index: u32,
        want: VcpuResponse,
        got: VcpuResponse,
    },
}

/// The owner's side of one vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u32,
    responses: Receiver<VcpuResponse>,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    pub(crate) fn new(
        index: u32,
        responses: Receiver<VcpuResponse>,
        thread: JoinHandle<()>,
    ) -> Self {
        Self {
            index,
            responses,
            thread,
        }
    }

    /// Drops answers left over from an earlier request that timed out.
    pub fn discard_stale(&self) {
        while self.responses.try_recv().is_ok() {}
    }

    /// Waits for the answer `want` to an event sent to this vCPU.
    pub fn expect(&self, want: VcpuResponse, timeout: Duration) -> Result<(), VcpuHandleError> {
        let index = self.index;
        match self.responses.recv_timeout(timeout) {
            Ok(got) if got == want => Ok(()),
            Ok(got) => Err(VcpuHandleError::Unexpected { index, want, got }),
            Err(RecvTimeoutError::Timeout) => Err(VcpuHandleError::Timeout { index, timeout }),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuHandleError::Gone { index }),
        }
    }

    /// Waits for the thread to end (after an `Exit` or a VM stop).
    pub fn join(self) {
        if self.thread.join().is_err() {
            log::error!("vCPU thread {} panicked", self.index);
        }
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Tells the kick handler which kvm_run this thread runs (null: none).
pub(crate) fn set_thread_kvm_run(p: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(p));
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: tell KVM to return from (or not enter)
    // KVM_RUN so the thread reads its events.
    let p = KVM_RUN.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer was set by this very thread to its vCPU's kvm_run
        // mapping, which outlives the thread's run loop; a volatile byte write
        // is what the immediate_exit protocol asks for.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

/// Installs the vCPU kick handler (once per process).
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
}

/// Kicks `thread` out of KVM_RUN. The caller guarantees the thread has not
/// been joined (`VmControl` holds its list locked while it kicks).
pub(crate) fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live vCPU thread (see above); the kick signal's
    // handler only sets immediate_exit, which is harmless at any point.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}
