//! The VMM as a systemd service (Type=notify): READY=1 once the VM runs (or
//! once the guest says it is up), a STATUS= line with the VM's memory,
//! WATCHDOG=1 from the main loop, STOPPING=1 and a longer stop timeout while
//! the guest shuts down. Outside systemd (no NOTIFY_SOCKET) it sends nothing.

mod marker;
mod memstatus;
mod watchdog;

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use std::sync::Arc;

use sd_notify::NotifyState;
use vmm_sys_util::eventfd::EventFd;

pub use marker::MarkerWatch;
use watchdog::{Watchdog, WatchdogAction};

use crate::config::SerialSink;
use crate::config::{ReadyMode, ServiceConfig};
use crate::devices::serial::SerialOut;
use crate::vm::{Supervisor, VmHandle};

/// How often the STATUS= memory line is refreshed.
const STATUS_PERIOD: Duration = Duration::from_secs(5);
/// Added to the shutdown timeout in EXTEND_TIMEOUT_USEC, for stopping the
/// VM and exiting after the guest's time is up.
const STOP_MARGIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// vCPUs not started, or waiting for the guest's ready marker.
    Booting,
    Running,
    Stopping,
}

pub struct SystemdSupervisor {
    ready: ReadyMode,
    marker: Option<String>,
    /// Signalled by the MarkerWatch on the serial output.
    ready_evt: Option<EventFd>,
    watchdog_stop_after: Option<Duration>,
    watchdog: Option<Watchdog>,
    /// Set once the VM runs: its figures and live settings for STATUS=.
    vm: Option<Arc<VmHandle>>,
    phase: Phase,
    next_status: Option<Instant>,
    last_status: String,
    notify_failed: bool,
}

impl std::fmt::Debug for SystemdSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemdSupervisor")
            .field("ready", &self.ready)
            .field("phase", &self.phase)
            .field("last_status", &self.last_status)
            .finish_non_exhaustive()
    }
}

impl SystemdSupervisor {
    /// `watchdog_stop_after` is fault injection: stop sending WATCHDOG=1
    /// after that long, to test that systemd restarts a silent VMM.
    pub fn new(
        service: &ServiceConfig,
        watchdog_stop_after: Option<Duration>,
    ) -> std::io::Result<Self> {
        let ready_evt = match service.ready {
            ReadyMode::Guest => Some(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?),
            ReadyMode::Running => None,
        };
        Ok(Self {
            ready: service.ready,
            marker: service.ready_marker.clone(),
            ready_evt,
            watchdog_stop_after,
            watchdog: None,
            vm: None,
            phase: Phase::Booting,
            next_status: None,
            last_status: String::new(),
            notify_failed: false,
        })
    }

    /// Wraps the guest's serial sink so that the ready marker is seen.
    ///
    /// Guest output going to the journal is written a whole line at a time:
    /// the VMM's log lines share that stream and would otherwise split the
    /// guest's lines; journald records only whole lines anyway.
    pub fn serial_tap(&self, sink: &SerialSink, out: SerialOut) -> std::io::Result<SerialOut> {
        let out: SerialOut =
            if *sink == SerialSink::Stdout && crate::logger::is_journal_stream(std::io::stdout()) {
                Box::new(std::io::LineWriter::new(out))
            } else {
                out
            };
        match (&self.ready_evt, &self.marker) {
            (Some(evt), Some(marker)) => {
                Ok(Box::new(MarkerWatch::new(out, marker, evt.try_clone()?)))
            }
            _ => Ok(out),
        }
    }

    fn notify(&mut self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            // Once at warn: a broken notify socket would repeat every tick.
            if self.notify_failed {
                log::debug!("sd_notify failed: {e}");
            } else {
                log::warn!("cannot notify systemd: {e}");
                self.notify_failed = true;
            }
        }
    }

    /// None while an API request is sampling the VM (try again later).
    fn running_status(&mut self) -> Option<String> {
        let mem = match self.vm.as_deref() {
            Some(vm) => memstatus::line(vm)?,
            None => "memory unknown".into(),
        };
        Some(format!("running; {mem}"))
    }

    fn set_status(&mut self, status: String) {
        if status != self.last_status {
            self.notify(&[NotifyState::Status(&status)]);
            self.last_status = status;
        }
    }

    fn become_ready(&mut self, now: Instant) {
        self.phase = Phase::Running;
        let status = self
            .running_status()
            .unwrap_or_else(|| "running".to_owned());
        self.notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.last_status = status;
        self.next_status = Some(now + STATUS_PERIOD);
    }
}

impl Supervisor for SystemdSupervisor {
    fn started(&mut self, vm: &Arc<VmHandle>) {
        let now = Instant::now();
        self.vm = Some(vm.clone());
        if let Some(timeout) = sd_notify::watchdog_enabled() {
            log::info!(
                "systemd watchdog: {timeout:?}; pinging every {:?}",
                timeout / 2
            );
            self.watchdog = Some(Watchdog::new(timeout, now, self.watchdog_stop_after));
        }
        match self.ready {
            ReadyMode::Running => self.become_ready(now),
            ReadyMode::Guest => {
                let marker = self.marker.clone().unwrap_or_default();
                self.set_status(format!(
                    "booting; waiting for the guest to print {marker:?}"
                ));
            }
        }
        self.tick(now);
    }

    fn guest_ready_fd(&self) -> Option<RawFd> {
        self.ready_evt.as_ref().map(|e| e.as_raw_fd())
    }

    fn guest_ready(&mut self) {
        if let Some(evt) = &self.ready_evt {
            let _ = evt.read();
        }
        if self.phase == Phase::Booting {
            log::info!("the guest printed its ready marker");
            self.become_ready(Instant::now());
        }
    }

    fn next_tick(&self) -> Option<Instant> {
        let watchdog = self.watchdog.as_ref().and_then(Watchdog::next_due);
        [watchdog, self.next_status].into_iter().flatten().min()
    }

    fn tick(&mut self, now: Instant) {
        if let Some(w) = self.watchdog.as_mut() {
            match w.poll(now) {
                WatchdogAction::Ping => self.notify(&[NotifyState::Watchdog]),
                WatchdogAction::Wait => {}
                WatchdogAction::Stop => {
                    log::warn!("fault injection: no longer sending WATCHDOG=1");
                }
            }
        }
        if self.phase == Phase::Running && self.next_status.is_some_and(|t| now >= t) {
            if let Some(status) = self.running_status() {
                self.set_status(status);
            }
            self.next_status = Some(now + STATUS_PERIOD);
        }
    }

    fn stopping(&mut self, timeout: Duration) {
        self.phase = Phase::Stopping;
        self.next_status = None;
        let extend = u32::try_from((timeout + STOP_MARGIN).as_micros()).unwrap_or(u32::MAX);
        let status = if timeout.is_zero() {
            "stopping".to_owned()
        } else {
            format!(
                "stopping; asked the guest to shut down, stopping it in {} s at the latest",
                timeout.as_secs()
            )
        };
        self.notify(&[
            NotifyState::Stopping,
            NotifyState::ExtendTimeoutUsec(extend),
            NotifyState::Status(&status),
        ]);
        self.last_status = status;
    }

    fn finishing(&mut self) {
        // The teardown is bounded (vCPUs joined, each disk's running request
        // finished, fdatasync), but a VM that stopped by itself is still
        // "running" to systemd: one last ping covers it.
        if self.watchdog.is_some() {
            self.notify(&[NotifyState::Watchdog]);
        }
        if self.phase != Phase::Stopping {
            self.notify(&[NotifyState::Stopping]);
        }
    }
}
