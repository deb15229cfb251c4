//! One probe guest: a `ksmvm run` child process started by the test kit's
//! launcher ([`ksmvm_testkit::Launch`]), its serial console on a pipe. The
//! kit kills the process when the [`Guest`] is dropped and, through
//! PR_SET_PDEATHSIG, when the harness itself dies, so no ksmvm outlives it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ksmvm::instance::socket_path_in;
use ksmvm_testkit::{Launch, SerialLine, Vmm, WaitError};

use crate::cancel;
use crate::caps::VmmCaps;
use crate::profile::Profile;

/// How to start guests: the binaries, extra `ksmvm run` flags, environment.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub ksmvm: PathBuf,
    pub probe: PathBuf,
    /// Added after the generated `ksmvm run` arguments.
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub caps: VmmCaps,
    /// The guests' KSMVM_RUNTIME_DIR (a [`ksmvm_testkit::RuntimeDir`]).
    pub runtime_dir: PathBuf,
    /// Where the guests' API sockets appear (their KSMVM_RUNTIME_DIR), when
    /// the binary has the control API.
    pub api_dir: Option<PathBuf>,
}

/// What one guest runs.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    pub mem_mib: u64,
    pub cmdline: String,
    /// MADV_MERGEABLE on guest RAM (`ksmvm run --ksm on|off`).
    pub ksm: bool,
    /// `ksmvm run --initrd`: the profile's memory image.
    pub initrd: Option<PathBuf>,
}

impl GuestSpec {
    /// A probe guest filling memory as `profile` says; `seed` makes its
    /// unique pages differ from every other guest's.
    pub fn probe(name: String, profile: &Profile, seed: u64, ksm: bool) -> Self {
        Self {
            name,
            mem_mib: profile.mem_mib,
            cmdline: profile.cmdline(seed),
            ksm,
            initrd: profile.image.clone(),
        }
    }
}

impl Launcher {
    /// The kit's launcher for `spec`: `ksmvm run` with the probe, the
    /// spec's flags, then [`Launcher::extra_args`].
    pub fn launch(&self, spec: &GuestSpec) -> Launch {
        let mut l = Launch::program(&self.ksmvm)
            .arg("run")
            .arg("--kernel")
            .arg(&self.probe)
            .args(["--mem-mib", &spec.mem_mib.to_string()])
            .args(["--cmdline", &spec.cmdline])
            .args(["--name", &spec.name])
            .args(["--serial", "stdout"])
            .runtime_dir(&self.runtime_dir);
        if let Some(initrd) = &spec.initrd {
            l = l.arg("--initrd").arg(initrd);
        }
        // Binaries whose --ksm is a flag always mark guest RAM mergeable;
        // their "KSM off" runs rely on ksmd being stopped instead.
        if self.caps.ksm_value {
            l = l.args(["--ksm", if spec.ksm { "on" } else { "off" }]);
        }
        if self.caps.shutdown_timeout {
            l = l.args(["--shutdown-timeout-s", "0"]);
        }
        l = l.args(&self.extra_args);
        for (k, v) in &self.env {
            l = l.env(k, v);
        }
        l
    }

    /// The command [`Launcher::launch`] runs, for display.
    pub fn command(&self, spec: &GuestSpec) -> Command {
        self.launch(spec).command()
    }
}

/// One guest of a run: the kit's [`Vmm`] with the harness's view of it
/// (name, size, when it was READY, its API socket), failing with
/// [`anyhow`] errors and stopping at Ctrl-C.
#[derive(Debug)]
pub struct Guest {
    pub name: String,
    pub mem_mib: u64,
    vmm: Vmm,
    pub ready_at: Option<Instant>,
    /// The VMM's control API socket, if it has one.
    pub api_socket: Option<PathBuf>,
}

impl Guest {
    /// Starts `ksmvm run` for `spec`.
    pub fn spawn(launcher: &Launcher, spec: &GuestSpec) -> Result<Self> {
        let mut g = Self::spawn_launch(launcher.launch(spec), spec.name.clone(), spec.mem_mib)?;
        g.api_socket = launcher
            .api_dir
            .as_ref()
            .map(|d| socket_path_in(d, &spec.name));
        Ok(g)
    }

    /// Starts any VMM whose stdout is the guest's serial console.
    pub fn spawn_launch(launch: Launch, name: String, mem_mib: u64) -> Result<Self> {
        let vmm = launch
            .spawn()
            .with_context(|| format!("{name}: starting the VMM"))?;
        Ok(Self {
            name,
            mem_mib,
            vmm,
            ready_at: None,
            api_socket: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.vmm.pid()
    }

    /// Just before the VMM was started.
    pub fn spawned_at(&self) -> Instant {
        self.vmm.spawned_at()
    }

    /// When the first byte of serial output arrived, if it has.
    pub fn first_byte_at(&self) -> Option<Instant> {
        self.vmm.first_byte_at()
    }

    /// Waits for a serial line containing `needle`; fails on `PROBE ERROR`,
    /// on exit of the VMM, on timeout and on Ctrl-C.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<SerialLine> {
        match self
            .vmm
            .try_expect_containing_until(needle, timeout, &mut cancel::is_cancelled)
        {
            Ok(line) => Ok(line),
            Err(WaitError::Interrupted) => Err(cancel::Interrupted.into()),
            Err(WaitError::Timeout) => bail!(
                "{}: no serial line containing {needle:?} within {timeout:?}{}",
                self.name,
                self.vmm.context()
            ),
            Err(WaitError::Exited(status)) => bail!(
                "{}: the VMM exited ({}) before printing {needle:?}{}",
                self.name,
                status.map_or("unknown status".into(), |s| s.to_string()),
                self.vmm.context()
            ),
            Err(e) => bail!("{}: {e}{}", self.name, self.vmm.context()),
        }
    }

    /// Waits for `PROBE READY` and records when it came.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Instant> {
        let line = self.wait_for("PROBE READY", timeout)?;
        self.ready_at = Some(line.at);
        Ok(line.at)
    }

    /// Sends one command line to the guest's serial input.
    pub fn send(&mut self, line: &str) -> Result<()> {
        self.vmm
            .try_send(line)
            .with_context(|| format!("{}: writing to the serial input", self.name))
    }

    /// Whether the process has exited (reaps it if so).
    pub fn has_exited(&mut self) -> bool {
        self.vmm.has_exited()
    }

    /// Asks the guest to power off (without waiting).
    pub fn request_poweroff(&mut self) {
        if !self.has_exited() {
            // A guest that does not listen any more is killed later.
            let _ = self.vmm.try_send("poweroff");
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps it.
    pub fn terminate(&mut self, grace: Duration) {
        self.vmm.stop(grace);
    }

    /// SIGKILL and reap; a no-op once it has exited.
    pub fn kill(&mut self) {
        self.vmm.kill();
    }

    /// Serial and stderr tails for error messages.
    pub fn context(&self) -> String {
        self.vmm.context()
    }
}
