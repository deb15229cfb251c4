//! vCPUs: configuration before the first run and the run loop, one thread
//! each. Exits are dispatched to the I/O and MMIO buses; anything the VMM
//! cannot continue from becomes an `ExitOutcome` with the facts needed to
//! understand it (exit reason, suberror, RIP, instruction bytes).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::bus::{lock, Bus};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitOutcome {
    /// The guest powered off (ACPI S5, KVM_SYSTEM_EVENT_SHUTDOWN).
    GuestPowerOff,
    /// The guest reset, i.e. rebooted (i8042 reset command, ACPI reset
    /// register, KVM_SYSTEM_EVENT_RESET).
    GuestReset,
    /// The guest kernel panicked (pvpanic, KVM_SYSTEM_EVENT_CRASH).
    GuestPanic,
    /// The host asked the VMM to stop (signal or API).
    Stopped(String),
    TripleFault {
        vcpu: u32,
        rip: Option<u64>,
    },
    InternalError {
        vcpu: u32,
        suberror: u32,
        rip: Option<u64>,
        insn: Vec<u8>,
    },
    FailEntry {
        vcpu: u32,
        reason: u64,
    },
    Unexpected {
        vcpu: u32,
        what: String,
    },
}

/// The VMM's exit statuses (README "Running a guest", docs/systemd.md).
pub mod exit_status {
    /// The guest powered off, or the host stopped the VM.
    pub const SUCCESS: u8 = 0;
    /// A VMM or host failure, or a guest fault (triple fault, emulation failure).
    pub const FAILURE: u8 = 1;
    /// Bad input: the configuration, a missing kernel or disk.
    pub const BAD_INPUT: u8 = 2;
    /// The guest rebooted: a supervisor should start it again.
    pub const GUEST_RESET: u8 = 3;
    /// The guest kernel panicked.
    pub const GUEST_PANIC: u8 = 4;
}

impl ExitOutcome {
    /// The VMM's exit status for this outcome.
    pub fn exit_status(&self) -> u8 {
        match self {
            ExitOutcome::GuestPowerOff | ExitOutcome::Stopped(_) => exit_status::SUCCESS,
            ExitOutcome::GuestReset => exit_status::GUEST_RESET,
            ExitOutcome::GuestPanic => exit_status::GUEST_PANIC,
            ExitOutcome::TripleFault { .. }
            | ExitOutcome::InternalError { .. }
            | ExitOutcome::FailEntry { .. }
            | ExitOutcome::Unexpected { .. } => exit_status::FAILURE,
        }
    }
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt_rip(rip: &Option<u64>) -> String {
    rip.map_or_else(|| "unknown".into(), |r| format!("{r:#x}"))
}

impl std::fmt::Display for ExitOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitOutcome::GuestPowerOff => write!(f, "the guest powered off"),
            ExitOutcome::GuestReset => write!(f, "the guest reset (reboot)"),
            ExitOutcome::GuestPanic => write!(f, "the guest kernel panicked"),
            ExitOutcome::Stopped(why) => write!(f, "stopped: {why}"),
            ExitOutcome::TripleFault { vcpu, rip } => write!(
                f,
                "guest triple fault on vCPU {vcpu} (KVM_EXIT_SHUTDOWN) at RIP {}",
                fmt_rip(rip)
            ),
            ExitOutcome::InternalError {
                vcpu,
                suberror,
                rip,
                insn,
            } => write!(
                f,
                "KVM_EXIT_INTERNAL_ERROR on vCPU {vcpu}: suberror {suberror} ({}), RIP {}, instruction bytes [{}]",
                suberror_name(*suberror),
                fmt_rip(rip),
                if insn.is_empty() { "unreadable".into() } else { hex_bytes(insn) }
            ),
            ExitOutcome::FailEntry { vcpu, reason } => write!(
                f,
                "KVM_EXIT_FAIL_ENTRY on vCPU {vcpu}: hardware entry failure reason {reason:#x}"
            ),
            ExitOutcome::Unexpected { vcpu, what } => {
                write!(f, "unsupported vCPU exit on vCPU {vcpu}: {what}")
            }
        }
    }
}

fn suberror_name(s: u32) -> &'static str {
    match s {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "event delivery failure",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

/// How long a guest that reported a panic may run on (to flush its console
/// and reboot) before the VMM stops it.
pub const PANIC_GRACE: Duration = Duration::from_secs(5);

/// State shared by the vCPU threads and whoever controls the VM.
pub struct VmControl {
    stop: AtomicBool,
    paused: Mutex<bool>,
    resume: Condvar,
    outcome: Mutex<Option<ExitOutcome>>,
    /// When the main loop stops a VM whose guest panicked but did not reset.
    stop_deadline: Mutex<Option<Instant>>,
    /// Written when the VM should stop (or a stop deadline was set); the
    /// main loop waits on it.
    pub exit_evt: EventFd,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl VmControl {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            stop: AtomicBool::new(false),
            paused: Mutex::new(false),
            resume: Condvar::new(),
            outcome: Mutex::new(None),
            stop_deadline: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            threads: Mutex::new(Vec::new()),
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
        // Wake paused vCPUs so they can see the stop flag.
        self.resume.notify_all();
        self.kick_all();
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

    pub fn set_paused(&self, paused: bool) {
        *lock(&self.paused) = paused;
        if paused {
            self.kick_all();
        } else {
            self.resume.notify_all();
        }
    }

    pub fn is_paused(&self) -> bool {
        *lock(&self.paused)
    }

    fn kick_all(&self) {
        for t in lock(&self.threads).iter() {
            // SAFETY: the thread ids belong to vCPU threads that are joined only
            // after the VM has stopped; a kick signal to a live thread is harmless
            // (its handler only sets immediate_exit).
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Blocks while paused; returns false when the VM is stopping.
    fn wait_while_paused(&self) -> bool {
        let mut p = lock(&self.paused);
        while *p && !self.stopping() {
            p = self.resume.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        !self.stopping()
    }
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: tell KVM to return from (or not enter)
    // KVM_RUN so the thread sees the stop/pause request.
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

    /// Starts the run loop on its own thread.
    pub fn start(self, control: Arc<VmControl>) -> Result<JoinHandle<()>, VcpuError> {
        let index = self.index;
        let thread_control = control.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                let _ = tx.send(unsafe { libc::pthread_self() });
                self.run_loop(&thread_control);
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        if let Ok(tid) = rx.recv() {
            lock(&control.threads).push(tid);
        }
        Ok(handle)
    }

    fn run_loop(mut self, control: &VmControl) {
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run() as *mut kvm_run));
        while !control.stopping() {
            if control.is_paused() && !control.wait_while_paused() {
                break;
            }
            if let Some(outcome) = self.run_once() {
                control.request_exit(outcome);
                break;
            }
            // A kick may have set immediate_exit; clear it before re-entering.
            self.fd.set_kvm_immediate_exit(0);
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
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
        let room = (0x1000 - (t.physical_address & 0xfff)) as usize;
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
