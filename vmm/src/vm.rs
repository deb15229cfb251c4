//! A built VM and its main loop: start the vCPU threads, wait for the guest
//! to stop or for the host to ask it to, forward host input to the serial
//! port, and report why it ended.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
use crate::devices::virtio::{BalloonHandle, EventLoopError, VirtioDevices};
use crate::shutdown::{GracefulShutdown, StopAction};
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
    #[error("virtio devices: {0}")]
    Virtio(#[from] EventLoopError),
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
    /// virtio devices, started on their own event-loop thread by `run`.
    pub virtio: VirtioDevices,
    /// Set when the VM has a balloon: the API's handle on it.
    pub balloon: Option<BalloonHandle>,
    /// Keeps /dev/kvm open for the VM's lifetime.
    pub _kvm: kvm_ioctls::Kvm,
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_RESET: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_STDIN: u64 = 3;
const TOKEN_READY: u64 = 4;

/// Whoever supervises the VMM (systemd, see `service`): the main loop
/// reports to it and runs its periodic work. Every method has a no-op default.
pub trait Supervisor {
    /// The vCPUs are running.
    fn started(&mut self, _mem: &GuestMemoryMmap) {}
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
}

/// For a VMM nobody supervises.
pub struct NoSupervisor;
impl Supervisor for NoSupervisor {}

/// Milliseconds from `now` until `t` for epoll_wait, rounded up so that the
/// loop does not wake just before `t` and spin.
fn wait_ms(t: Option<Instant>, now: Instant) -> i32 {
    match t {
        None => -1,
        Some(t) => {
            let d = t.saturating_duration_since(now);
            i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        }
    }
}

fn epoll_add(epoll: &Epoll, fd: i32, token: u64) -> Result<(), VmError> {
    epoll
        .ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
        .map_err(VmError::EventLoop)
}

fn join_vcpus(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        if h.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
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
    /// Runs the VM to completion and returns why it stopped; SIGINT/SIGTERM
    /// stop it at once.
    pub fn run(self) -> Result<ExitOutcome, VmError> {
        self.run_with_api(None)
    }

    /// Like [`Vm::run`], serving the control API on `api` while the vCPUs
    /// run; the socket is removed when the VM ends, also on error paths.
    pub fn run_with_api(self, api: Option<ApiSocket>) -> Result<ExitOutcome, VmError> {
        self.run_supervised(api, Duration::ZERO, &mut NoSupervisor)
    }

    /// Runs the VM to completion under `sup`, serving the control API on
    /// `api`. The first SIGINT/SIGTERM asks the guest to shut down
    /// (Ctrl-Alt-Del) and stops the VM after `shutdown_timeout` if it has
    /// not; a second signal stops it at once.
    pub fn run_supervised(
        mut self,
        api: Option<ApiSocket>,
        shutdown_timeout: Duration,
        sup: &mut dyn Supervisor,
    ) -> Result<ExitOutcome, VmError> {
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
        if let Some(fd) = sup.guest_ready_fd() {
            epoll_add(&epoll, fd, TOKEN_READY)?;
        }

        // Device work runs on its own thread, never on a vCPU thread.
        let devices = self.virtio.start()?;
        let handles: Vec<JoinHandle<()>> = std::mem::take(&mut self.vcpus)
            .into_iter()
            .map(|v| v.start(self.control.clone()))
            .collect::<Result<_, _>>()?;
        crate::milestone!("vCPUs running");

        // The guest boots first; clients that connect meanwhile wait in the
        // socket's backlog. After the signal mask above, so the server's
        // threads inherit it; dropped when run returns, after the vCPUs are
        // joined.
        let _api = match api {
            Some(socket) => {
                let vm = LiveVm::with_sampler(&self.config, self.control.clone(), self.mem.clone())
                    .with_balloon(self.balloon.clone());
                match ApiServer::start(socket, Arc::new(vm)) {
                    Ok(server) => Some(server),
                    Err(e) => {
                        self.control
                            .request_exit(ExitOutcome::Stopped("the API server failed".into()));
                        join_vcpus(handles);
                        return Err(VmError::Api(e));
                    }
                }
            }
            None => None,
        };
        crate::milestone!("API serving");
        log::info!(
            "VM {} running with {} vCPU(s)",
            self.config.name,
            handles.len()
        );
        sup.started(&self.mem);

        let mut shutdown = GracefulShutdown::new(shutdown_timeout);
        let mut events = vec![EpollEvent::default(); 8];
        while !self.control.stopping() {
            let now = Instant::now();
            let wake = [
                sup.next_tick(),
                shutdown.deadline(),
                self.control.stop_deadline(),
            ]
            .into_iter()
            .flatten()
            .min();
            let n = match epoll.wait(wait_ms(wake, now), &mut events) {
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
                    // A stop deadline was set (the loop condition sees a stop).
                    TOKEN_EXIT => {
                        let _ = self.control.exit_evt.read();
                    }
                    TOKEN_RESET => {
                        let _ = self.reset_evt.read();
                        self.control.request_exit(ExitOutcome::GuestReset);
                    }
                    TOKEN_SIGNAL => {
                        if let Ok(Some(info)) = sigfd.read_signal() {
                            let name = Signal::try_from(info.ssi_signo as i32)
                                .map(|s| s.as_str())
                                .unwrap_or("signal");
                            on_stop_signal(name, &self.i8042, &self.control, &mut shutdown, sup);
                        }
                    }
                    TOKEN_READY => sup.guest_ready(),
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
            let now = Instant::now();
            if self.control.stop_deadline().is_some_and(|d| now >= d) && !self.control.stopping() {
                log::warn!(
                    "the guest kernel panicked and did not reset within {} s; stopping the VM",
                    crate::vcpu::PANIC_GRACE.as_secs()
                );
                self.control.request_exit(ExitOutcome::GuestPanic);
            }
            if shutdown.expired(now) && !self.control.stopping() {
                let secs = shutdown.timeout().as_secs();
                log::warn!("the guest did not shut down within {secs} s; stopping the VM");
                self.control.request_exit(ExitOutcome::Stopped(format!(
                    "the guest did not shut down within {secs} s"
                )));
            }
            sup.tick(now);
        }
        join_vcpus(handles);
        // With the vCPUs stopped no new requests arrive; the devices finish
        // what they have (disk writes included) before the VMM exits.
        if let Err(e) = devices.stop() {
            log::error!("cannot stop the virtio devices: {e}");
        }
        if let Err(e) = devices.join() {
            log::error!("virtio devices: {e}");
        }
        // Whatever the guest wrote is on the host's disk before the VMM exits.
        crate::shutdown::flush_disks(&self.config.disks);
        Ok(self
            .control
            .outcome()
            .unwrap_or_else(|| ExitOutcome::Stopped("no reason recorded".into())))
    }
}

/// The first stop signal asks the guest to shut down; a second one, or any
/// with a zero shutdown timeout, stops the VM at once.
fn on_stop_signal(
    name: &str,
    i8042: &Mutex<I8042>,
    control: &VmControl,
    shutdown: &mut GracefulShutdown,
    sup: &mut dyn Supervisor,
) {
    match shutdown.on_signal(Instant::now()) {
        StopAction::AskGuest => {
            let timeout = shutdown.timeout();
            log::info!(
                "received {name}: asking the guest to shut down (Ctrl-Alt-Del); stopping the VM in {} s at the latest",
                timeout.as_secs()
            );
            lock(i8042).send_ctrl_alt_del();
            sup.stopping(timeout);
        }
        StopAction::StopNow => {
            log::info!("received {name}, stopping the VM");
            sup.stopping(Duration::ZERO);
            control.request_exit(ExitOutcome::Stopped(name.to_string()));
        }
    }
}
