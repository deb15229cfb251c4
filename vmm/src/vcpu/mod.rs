//! vCPUs: configuration before the first run and the run loop, one thread
//! each. Exits are dispatched to the I/O and MMIO buses; anything the VMM
//! cannot continue from becomes an `ExitOutcome` with the facts needed to
//! understand it (exit reason, suberror, RIP, instruction bytes).
//!
//! Once started, a vCPU is reached only through its [`VcpuHandle`] (the
//! answers to events) and the VM's [`VmControl`] (events and kicks).

mod control;
mod handle;

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use control::{VmControl, PANIC_GRACE};
pub use handle::{register_kick_handler, VcpuEvent, VcpuHandle, VcpuHandleError, VcpuResponse};
// Where the outcome lived before it had its own module.
pub use crate::outcome::ExitOutcome;

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::bus::Bus;
use crate::threads::{self, ThreadKind};
use control::VcpuLink;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set CPUID on vCPU {index}: {source}")]
    Cpuid {
        index: u32,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {source}")]
    Msr { index: u32, source: msr::MsrError },
    #[error("vCPU {index}: {source}")]
    Regs { index: u32, source: regs::RegsError },
    #[error("cannot set {what} on vCPU {index}: {source}")]
    Set {
        index: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot start vCPU thread {index}: {source}")]
    Spawn { index: u32, source: std::io::Error },
}

pub struct Vcpu {
    pub index: u32,
    fd: VcpuFd,
    mem: GuestMemoryMmap,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    pub fn new(
        vm: &kvm_ioctls::VmFd,
        index: u32,
        mem: GuestMemoryMmap,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self {
            index,
            fd,
            mem,
            io_bus,
            mmio_bus,
        })
    }

    /// Sets CPUID, MSRs, FPU and LAPIC on every vCPU, and the boot registers on
    /// the boot processor (the others wait for INIT/SIPI in the in-kernel LAPIC).
    pub fn configure(&self, base_cpuid: &CpuId, vcpus: u32, entry: u64) -> Result<(), VcpuError> {
        let index = self.index;
        let set = |what| {
            move |source| VcpuError::Set {
                index,
                what,
                source,
            }
        };
        let mut cpuid = base_cpuid.clone();
        cpuid::normalize(&mut cpuid, index, vcpus);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::Cpuid { index, source })?;
        msr::setup_msrs(&self.fd).map_err(|source| VcpuError::Msr { index, source })?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(set("FPU state"))?;
        interrupts::set_lint(&self.fd).map_err(set("LAPIC LINT0/LINT1"))?;
        if index == 0 {
            let sregs = regs::setup_sregs(&self.mem, &self.fd)
                .map_err(|source| VcpuError::Regs { index, source })?;
            self.fd
                .set_sregs(&sregs)
                .map_err(set("special registers"))?;
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(set("registers"))?;
        }
        Ok(())
    }

    /// Starts the run loop on its own thread; from now on the vCPU answers
    /// the events `control` broadcasts through the returned handle.
    pub fn start(self, control: Arc<VmControl>) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let (events_tx, events) = mpsc::channel();
        let (responses, responses_rx) = mpsc::channel();
        // The thread runs guest code only once the control knows it, so
        // that a stop requested meanwhile (by another vCPU) reaches it too.
        let (go_tx, go) = mpsc::channel::<()>();
        let thread_control = control.clone();
        let thread = threads::spawn(ThreadKind::Vcpu(index), move || {
            if go.recv().is_ok() {
                self.run_loop(&thread_control, &events, &responses);
            }
        })
        .map_err(|source| VcpuError::Spawn { index, source })?;
        control.attach(VcpuLink {
            events: events_tx,
            thread: std::os::unix::thread::JoinHandleExt::as_pthread_t(&thread),
        });
        // The thread holds the receiver until it has run: this cannot fail.
        let _ = go_tx.send(());
        Ok(VcpuHandle::new(index, responses_rx, thread))
    }

    fn run_loop(
        mut self,
        control: &VmControl,
        events: &Receiver<VcpuEvent>,
        responses: &Sender<VcpuResponse>,
    ) {
        // Before the first look at the events: a kick that comes later
        // makes KVM_RUN return at once, so no event waits for an exit.
        handle::set_thread_kvm_run(self.fd.get_kvm_run() as *mut kvm_run);
        while handle_events(events, responses) && !control.stopping() {
            if let Some(outcome) = self.run_once() {
                control.request_exit(outcome);
                break;
            }
            // A kick may have set immediate_exit; clear it before re-entering.
            self.fd.set_kvm_immediate_exit(0);
        }
        handle::set_thread_kvm_run(std::ptr::null_mut());
    }

    /// Runs the vCPU until one exit; returns an outcome when the VM must stop.
    fn run_once(&mut self) -> Option<ExitOutcome> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.io_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.io_bus.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.mmio_bus.write(addr, data);
                None
            }
            // Only without an in-kernel LAPIC, which the builder always creates.
            Ok(VcpuExit::Hlt) => Some(ExitOutcome::GuestPowerOff),
            Ok(VcpuExit::Shutdown) => Some(ExitOutcome::TripleFault {
                vcpu: index,
                rip: self.rip(),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitOutcome::GuestPowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(ExitOutcome::GuestReset),
                kvm_bindings::KVM_SYSTEM_EVENT_CRASH => Some(ExitOutcome::GuestPanic),
                other => Some(ExitOutcome::Unexpected {
                    vcpu: index,
                    what: format!("KVM_EXIT_SYSTEM_EVENT type {other}"),
                }),
            },
            Ok(VcpuExit::InternalError) => Some(self.internal_error()),
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Some(ExitOutcome::FailEntry {
                vcpu: index,
                reason,
            }),
            Ok(VcpuExit::Intr) => None,
            Ok(other) => Some(ExitOutcome::Unexpected {
                vcpu: index,
                what: format!("{other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(ExitOutcome::Unexpected {
                vcpu: index,
                what: format!("KVM_RUN failed: {e}"),
            }),
        }
    }

    fn rip(&self) -> Option<u64> {
        self.fd.get_regs().ok().map(|r| r.rip)
    }

    fn internal_error(&mut self) -> ExitOutcome {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is
        // the union member the kernel filled in.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self.rip();
        let insn = rip.map(|r| self.instruction_bytes(r)).unwrap_or_default();
        ExitOutcome::InternalError {
            vcpu: self.index,
            suberror,
            rip,
            insn,
        }
    }

    /// Reads up to 15 bytes at the guest virtual address `rip`.
    fn instruction_bytes(&self, rip: u64) -> Vec<u8> {
        let Ok(t) = self.fd.translate_gva(rip) else {
            return Vec::new();
        };
        if t.valid == 0 {
            return Vec::new();
        }
        let mut buf = [0u8; 15];
        // Stop at the page end: the next page may map elsewhere.
        let room = crate::usize_of(0x1000 - (t.physical_address & 0xfff));
        let n = buf.len().min(room);
        match self
            .mem
            .read_slice(&mut buf[..n], GuestAddress(t.physical_address))
        {
            Ok(()) => buf[..n].to_vec(),
            Err(_) => Vec::new(),
        }
    }
}

/// Acts on the events waiting for this vCPU; while paused, blocks until
/// resumed. Returns false when the vCPU must leave its run loop.
fn handle_events(events: &Receiver<VcpuEvent>, responses: &Sender<VcpuResponse>) -> bool {
    let mut paused = false;
    loop {
        let event = if paused {
            match events.recv() {
                Ok(e) => e,
                Err(_) => return false,
            }
        } else {
            match events.try_recv() {
                Ok(e) => e,
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        };
        // An owner that gave up waiting has dropped its receiver: no matter.
        match event {
            VcpuEvent::Pause => {
                paused = true;
                let _ = responses.send(VcpuResponse::Paused);
            }
            VcpuEvent::Resume => {
                paused = false;
                let _ = responses.send(VcpuResponse::Resumed);
            }
            VcpuEvent::Exit => return false,
        }
    }
}

#[cfg(test)]
mod tests;
