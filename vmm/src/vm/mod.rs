//! A built VM, and the running one: [`Vm::start`] starts the device loop
//! and the vCPU threads and returns a [`RunningVm`], whose main loop runs
//! on the calling thread, and whose [`VmHandle`] is what everything else
//! (API, supervisor, CLI) holds.

mod handle;
mod info;
mod run_loop;
mod supervisor;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

pub use handle::{VmHandle, VmHandleError, VmIdentity, VCPU_ANSWER_TIMEOUT};
pub use info::{VmInfo, VmState};
pub use run_loop::RunningVm;
pub use supervisor::{NoSupervisor, Supervisor};

use crate::config::VmConfig;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::{EventLoopError, VirtioDevices};
use crate::outcome::ExitOutcome;
use crate::vcpu::{Vcpu, VcpuError, VmControl};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot set up the VMM event loop: {0}")]
    EventLoop(std::io::Error),
    #[error("cannot block signals for the VMM: {0}")]
    Signals(nix::Error),
    #[error("cannot install the vCPU kick handler: {0}")]
    KickHandler(vmm_sys_util::errno::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("virtio devices: {0}")]
    Virtio(#[from] EventLoopError),
}

/// Everything a VM is made of, built and not yet running (see `builder`).
pub struct Vm {
    pub(crate) config: VmConfig,
    pub(crate) kvm_vm: kvm_ioctls::VmFd,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) control: Arc<VmControl>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    /// Written by the i8042 when the guest resets the machine.
    pub(crate) reset_evt: EventFd,
    pub(crate) vcpus: Vec<Vcpu>,
    /// virtio devices, started on their own event-loop thread by `start`.
    pub(crate) virtio: VirtioDevices,
    /// Keeps /dev/kvm open for the VM's lifetime.
    pub(crate) kvm: kvm_ioctls::Kvm,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.config.name)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_RESET: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_STDIN: u64 = 3;
const TOKEN_READY: u64 = 4;

fn epoll_add(epoll: &Epoll, fd: i32, token: u64) -> Result<(), VmError> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
        .map_err(VmError::EventLoop)
}

/// Whether host stdin should feed the guest's serial input: a terminal or a
/// pipe does, /dev/null or a closed stdin does not.
fn stdin_is_input() -> bool {
    match nix::sys::stat::fstat(std::io::stdin()) {
        Ok(st) => {
            let kind = st.st_mode & libc::S_IFMT;
            kind == libc::S_IFIFO
                || kind == libc::S_IFSOCK
                || (kind == libc::S_IFCHR && nix::unistd::isatty(std::io::stdin()).unwrap_or(false))
        }
        Err(_) => false,
    }
}

/// SIGINT/SIGTERM go to a signalfd read by the main loop only; every
/// thread started afterwards (vCPUs, devices, API) inherits the mask.
fn block_stop_signals() -> Result<SignalFd, VmError> {
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block().map_err(VmError::Signals)?;
    SignalFd::with_flags(&sigs, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(VmError::Signals)
}

impl Vm {
    /// Runs the VM to completion on this thread and returns why it stopped;
    /// SIGINT/SIGTERM stop it at once.
    pub fn run(self) -> Result<ExitOutcome, VmError> {
        self.start()?.wait(Duration::ZERO, &mut NoSupervisor)
    }

    /// Starts the device loop and the vCPUs. Call from the thread that will
    /// run the main loop (`RunningVm::wait`), before starting any other
    /// thread that must not receive SIGINT/SIGTERM.
    pub fn start(self) -> Result<RunningVm, VmError> {
        let sigfd = block_stop_signals()?;
        crate::vcpu::register_kick_handler().map_err(VmError::KickHandler)?;

        let epoll = Epoll::new().map_err(VmError::EventLoop)?;
        epoll_add(&epoll, self.control.exit_evt.as_raw_fd(), TOKEN_EXIT)?;
        epoll_add(&epoll, self.reset_evt.as_raw_fd(), TOKEN_RESET)?;
        epoll_add(&epoll, sigfd.as_raw_fd(), TOKEN_SIGNAL)?;
        // Regular files cannot be polled; they are not interactive input anyway.
        if stdin_is_input() && epoll_add(&epoll, libc::STDIN_FILENO, TOKEN_STDIN).is_err() {
            log::debug!("stdin cannot be polled; guest serial input disabled");
        }

        // Device work runs on its own thread, never on a vCPU thread.
        let (event_loop, devices) = self.virtio.start()?;
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus {
            match vcpu.start(self.control.clone()) {
                Ok(h) => vcpus.push(h),
                Err(e) => {
                    self.control
                        .request_exit(ExitOutcome::Stopped(format!("{e}")));
                    self.control.detach_all();
                    vcpus.into_iter().for_each(crate::vcpu::VcpuHandle::join);
                    return Err(e.into());
                }
            }
        }
        crate::milestone!("vCPUs running");
        let identity = VmIdentity {
            name: self.config.name.clone(),
            vcpus: self.config.vcpus,
            mem_mib: self.config.mem_mib,
            kernel: self.config.kernel.clone(),
        };
        let handle = Arc::new(VmHandle::new(
            identity,
            self.control.clone(),
            self.mem,
            self.config.ksm,
            vcpus,
            devices,
            crate::devices::bus::lock(&self.serial).stats(),
        ));
        Ok(RunningVm {
            handle,
            epoll,
            sigfd,
            event_loop,
            serial: self.serial,
            i8042: self.i8042,
            reset_evt: self.reset_evt,
            _kvm_vm: self.kvm_vm,
            _kvm: self.kvm,
        })
    }
}

impl crate::outcome::HasExitStatus for VmError {
    /// Starting a built VM fails only for the host's reasons.
    fn exit_status(&self) -> crate::outcome::ExitStatus {
        crate::outcome::ExitStatus::Failure
    }
}

#[cfg(test)]
mod tests;
