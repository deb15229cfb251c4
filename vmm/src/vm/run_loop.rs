//! The VMM's main loop: wait for the guest to stop or for the host to ask
//! it to, forward host input to the serial port, run the supervisor's
//! periodic work, and tear the VM down in order when it ends.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};
use vmm_sys_util::eventfd::EventFd;

use super::{epoll_add, Supervisor, VmError, VmHandle};
use super::{TOKEN_EXIT, TOKEN_READY, TOKEN_RESET, TOKEN_SIGNAL, TOKEN_STDIN};
use crate::devices::bus::lock;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::EventLoopHandle;
use crate::devices::virtio::{kind_name, Block};
use crate::outcome::ExitOutcome;
use crate::shutdown::{GracefulShutdown, StopAction};
use crate::vcpu::{VcpuHandle, VmControl};

/// How often IRQ 1 is raised again while the guest leaves the Ctrl-Alt-Del
/// keys unread.
const CAD_NUDGE: Duration = Duration::from_secs(5);

/// Re-raises the keyboard IRQ during a graceful stop while the guest has
/// not read the keys (a lost edge would leave it running until the
/// timeout).
#[derive(Debug, Default)]
struct CadNudge {
    next: Option<Instant>,
    said: bool,
}

impl CadNudge {
    fn tick(&mut self, now: Instant, i8042: &Mutex<I8042>) {
        let Some(next) = self.next else {
            self.next = Some(now + CAD_NUDGE);
            return;
        };
        if now < next {
            return;
        }
        self.next = Some(now + CAD_NUDGE);
        let dev = lock(i8042);
        if dev.nudge() && !self.said {
            self.said = true;
            log::info!(
                "the guest has not read the Ctrl-Alt-Del keys ({} bytes left) after {} s; raising IRQ 1 again every {} s",
                dev.unread(),
                CAD_NUDGE.as_secs(),
                CAD_NUDGE.as_secs()
            );
        }
    }
}

/// A VM whose vCPUs run; owned by the thread that runs its main loop.
pub struct RunningVm {
    pub(super) handle: Arc<VmHandle>,
    pub(super) epoll: Epoll,
    pub(super) sigfd: SignalFd,
    pub(super) event_loop: EventLoopHandle,
    pub(super) serial: Arc<Mutex<SerialDevice>>,
    pub(super) i8042: Arc<Mutex<I8042>>,
    pub(super) reset_evt: EventFd,
    pub(super) _kvm_vm: kvm_ioctls::VmFd,
    pub(super) _kvm: kvm_ioctls::Kvm,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vm", &self.handle)
            .finish_non_exhaustive()
    }
}

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

impl RunningVm {
    /// The handle the API, the supervisor and the CLI share.
    pub fn handle(&self) -> Arc<VmHandle> {
        self.handle.clone()
    }

    /// Stops the VM at once and tears it down (a start-up step after
    /// `Vm::start` failed).
    pub fn abort(self, why: &str) -> ExitOutcome {
        self.handle.stop(why);
        self.finish()
    }

    /// Runs the main loop until the VM stops, under `sup`. The first
    /// SIGINT/SIGTERM asks the guest to shut down (Ctrl-Alt-Del) and stops
    /// the VM after `shutdown_timeout` if it has not; a second signal stops
    /// it at once.
    pub fn wait(
        self,
        shutdown_timeout: Duration,
        sup: &mut dyn Supervisor,
    ) -> Result<ExitOutcome, VmError> {
        if let Some(fd) = sup.guest_ready_fd() {
            if let Err(e) = epoll_add(&self.epoll, fd, TOKEN_READY) {
                self.abort("the main loop failed to start");
                return Err(e);
            }
        }
        log::info!(
            "VM {} running with {} vCPU(s)",
            self.handle.name(),
            self.handle.identity().vcpus
        );
        sup.started(&self.handle);

        let control = self.handle.control().clone();
        let mut shutdown = GracefulShutdown::new(shutdown_timeout);
        let mut nudge = CadNudge::default();
        let mut events = vec![EpollEvent::default(); 8];
        while !control.stopping() {
            let now = Instant::now();
            let wake = [
                sup.next_tick(),
                shutdown.deadline(),
                control.stop_deadline(),
                nudge.next,
            ]
            .into_iter()
            .flatten()
            .min();
            let n = match self.epoll.wait(wait_ms(wake, now), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    control.request_exit(ExitOutcome::Stopped(format!("event loop failed: {e}")));
                    break;
                }
            };
            for ev in &events[..n] {
                self.on_event(ev.data(), &control, &mut shutdown, sup);
            }
            let now = Instant::now();
            if control.stop_deadline().is_some_and(|d| now >= d) && !control.stopping() {
                log::warn!(
                    "the guest kernel panicked and did not reset within {} s; stopping the VM",
                    crate::vcpu::PANIC_GRACE.as_secs()
                );
                control.request_exit(ExitOutcome::GuestPanic);
            }
            if shutdown.deadline().is_some() {
                nudge.tick(now, &self.i8042);
            }
            if shutdown.expired(now) && !control.stopping() {
                let secs = shutdown.timeout().as_secs();
                let unread = lock(&self.i8042).unread();
                log::warn!(
                    "the guest did not shut down within {secs} s; stopping the VM ({})",
                    if unread == 0 {
                        "it had read the Ctrl-Alt-Del keys".to_owned()
                    } else {
                        format!("{unread} bytes of the Ctrl-Alt-Del keys unread")
                    }
                );
                control.request_exit(ExitOutcome::Stopped(format!(
                    "the guest did not shut down within {secs} s"
                )));
            }
            sup.tick(now);
        }
        sup.finishing();
        Ok(self.finish())
    }

    fn on_event(
        &self,
        token: u64,
        control: &VmControl,
        shutdown: &mut GracefulShutdown,
        sup: &mut dyn Supervisor,
    ) {
        match token {
            // A stop deadline was set (the loop condition sees a stop).
            TOKEN_EXIT => {
                let _ = control.exit_evt.read();
            }
            TOKEN_RESET => {
                let _ = self.reset_evt.read();
                control.request_exit(ExitOutcome::GuestReset);
            }
            TOKEN_SIGNAL => {
                if let Ok(Some(info)) = self.sigfd.read_signal() {
                    let name = i32::try_from(info.ssi_signo)
                        .ok()
                        .and_then(|n| Signal::try_from(n).ok())
                        .map_or("signal", |s| s.as_str());
                    self.on_stop_signal(name, control, shutdown, sup);
                }
            }
            TOKEN_READY => sup.guest_ready(),
            TOKEN_STDIN => {
                let mut buf = [0u8; 1024];
                match std::io::stdin().lock().read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = self.epoll.ctl(
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

    /// Joins the vCPUs, lets the devices finish, flushes the disks, and
    /// returns the recorded outcome. The VM must be stopping.
    fn finish(self) -> ExitOutcome {
        let control = self.handle.control().clone();
        // No kick may reach a joined thread: forget them first.
        control.detach_all();
        self.handle
            .take_vcpus()
            .into_iter()
            .for_each(VcpuHandle::join);
        // With the vCPUs stopped no new requests arrive; the devices finish
        // what they have (disk writes included) before the VMM exits.
        if let Err(e) = self.event_loop.stop() {
            log::error!("cannot stop the virtio devices: {e}");
        }
        if let Err(e) = self.event_loop.join() {
            log::error!("virtio devices: {e}");
        }
        // Whatever the guest wrote is on the host's disk before the VMM exits.
        flush_disks(&self.handle);
        control
            .outcome()
            .unwrap_or_else(|| ExitOutcome::Stopped("no reason recorded".into()))
    }
}

/// Makes every writable disk durable after the devices have stopped:
/// the guest's last writes may still be in the host's page cache, and a
/// stopped service must not depend on it. Each through its device's own
/// descriptor, under the image lock the device still holds.
fn flush_disks(vm: &VmHandle) {
    let disks: Vec<String> = vm
        .devices()
        .filter(|(_, info)| kind_name(info.device_type) == "disk")
        .map(|(id, _)| id.clone())
        .collect();
    for id in disks {
        match vm.with_device::<Block, _>(&id, |b| (b.path().to_path_buf(), b.flush_to_host())) {
            Ok((path, Ok(true))) => log::info!("flushed disk {} ({id})", path.display()),
            Ok((_, Ok(false))) => {}
            Ok((path, Err(e))) => {
                log::error!("cannot flush disk {} ({id}): {e}", path.display());
            }
            Err(e) => log::error!("cannot flush disk {id}: {e}"),
        }
    }
}

impl RunningVm {
    /// The first stop signal asks the guest to shut down (resuming it first
    /// if it is paused, so that it can); a second one, or any with a zero
    /// shutdown timeout, stops the VM at once.
    fn on_stop_signal(
        &self,
        name: &str,
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
                if self.handle.is_paused() {
                    if let Err(e) = self.handle.resume() {
                        log::warn!("cannot resume the paused guest to shut it down: {e}");
                    }
                }
                lock(&self.i8042).send_ctrl_alt_del();
                sup.stopping(timeout);
            }
            StopAction::StopNow => {
                log::info!("received {name}, stopping the VM");
                sup.stopping(Duration::ZERO);
                control.request_exit(ExitOutcome::Stopped(name.to_string()));
            }
        }
    }
}
