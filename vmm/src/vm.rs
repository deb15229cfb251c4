//! A built VM and its main loop: start the vCPU threads, wait for the guest
//! to stop or for the host to ask it to, forward host input to the serial
//! port, and report why it ended.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiServer, ApiSocket, LiveVm};
use crate::config::VmConfig;
use crate::devices::bus::lock;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::vcpu::{ExitOutcome, Vcpu, VcpuError, VmControl};

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
    #[error("cannot start the API server: {0}")]
    Api(std::io::Error),
}

/// Everything a running VM is made of.
pub struct Vm {
    pub config: VmConfig,
    pub kvm_vm: kvm_ioctls::VmFd,
    pub mem: GuestMemoryMmap,
    pub control: Arc<VmControl>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    /// Written by the i8042 when the guest resets the machine.
    pub reset_evt: EventFd,
    pub vcpus: Vec<Vcpu>,
    /// Keeps /dev/kvm open for the VM's lifetime.
    pub _kvm: kvm_ioctls::Kvm,
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_RESET: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_STDIN: u64 = 3;

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

impl Vm {
    /// Runs the VM to completion and returns why it stopped.
    pub fn run(self) -> Result<ExitOutcome, VmError> {
        self.run_with_api(None)
    }

    /// Like [`Vm::run`], serving the control API on `api` while the vCPUs
    /// run; the socket is removed when the VM ends, also on error paths.
    pub fn run_with_api(self, api: Option<ApiSocket>) -> Result<ExitOutcome, VmError> {
        // SIGINT/SIGTERM go to a signalfd read by this thread only; the vCPU
        // threads inherit the blocked mask.
        let mut sigs = SigSet::empty();
        sigs.add(Signal::SIGINT);
        sigs.add(Signal::SIGTERM);
        sigs.thread_block().map_err(VmError::Signals)?;
        let sigfd = SignalFd::with_flags(&sigs, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(VmError::Signals)?;
        crate::vcpu::register_kick_handler().map_err(VmError::KickHandler)?;

        let epoll = Epoll::new().map_err(VmError::EventLoop)?;
        epoll_add(&epoll, self.control.exit_evt.as_raw_fd(), TOKEN_EXIT)?;
        epoll_add(&epoll, self.reset_evt.as_raw_fd(), TOKEN_RESET)?;
        epoll_add(&epoll, sigfd.as_raw_fd(), TOKEN_SIGNAL)?;
        // Regular files cannot be polled; they are not interactive input anyway.
        if stdin_is_input() && epoll_add(&epoll, libc::STDIN_FILENO, TOKEN_STDIN).is_err() {
            log::debug!("stdin cannot be polled; guest serial input disabled");
        }

        // After the signal mask above, so the server's threads inherit it;
        // dropped when run returns, after the vCPUs are joined.
        let _api = match api {
            Some(socket) => {
                let vm = LiveVm::with_sampler(&self.config, self.control.clone(), self.mem.clone());
                Some(ApiServer::start(socket, Arc::new(vm)).map_err(VmError::Api)?)
            }
            None => None,
        };

        let handles: Vec<JoinHandle<()>> = self
            .vcpus
            .into_iter()
            .map(|v| v.start(self.control.clone()))
            .collect::<Result<_, _>>()?;
        log::info!(
            "VM {} running with {} vCPU(s)",
            self.config.name,
            handles.len()
        );

        let mut events = vec![EpollEvent::default(); 8];
        while !self.control.stopping() {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.control
                        .request_exit(ExitOutcome::Stopped(format!("event loop failed: {e}")));
                    break;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_RESET => {
                        let _ = self.reset_evt.read();
                        self.control.request_exit(ExitOutcome::GuestShutdown);
                    }
                    TOKEN_SIGNAL => {
                        if let Ok(Some(info)) = sigfd.read_signal() {
                            let name = Signal::try_from(info.ssi_signo as i32)
                                .map(|s| s.as_str())
                                .unwrap_or("signal");
                            log::info!("received {name}, stopping the VM");
                            self.control
                                .request_exit(ExitOutcome::Stopped(name.to_string()));
                        }
                    }
                    TOKEN_STDIN => {
                        let mut buf = [0u8; 1024];
                        match std::io::stdin().lock().read(&mut buf) {
                            Ok(0) | Err(_) => {
                                let _ = epoll.ctl(
                                    ControlOperation::Delete,
                                    libc::STDIN_FILENO,
                                    EpollEvent::default(),
                                );
                            }
                            Ok(k) => lock(&self.serial).queue_input(&buf[..k]),
                        }
                    }
                    _ => {}
                }
            }
        }
        for h in handles {
            if h.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        Ok(self
            .control
            .outcome()
            .unwrap_or_else(|| ExitOutcome::Stopped("no reason recorded".into())))
    }
}
