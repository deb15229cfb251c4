//! One probe guest: a `ksmvm run` child process with its serial console on
//! a pipe. The process is killed when the [`Guest`] is dropped and, through
//! PR_SET_PDEATHSIG, when the harness itself dies, so no ksmvm outlives it.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::cancel;
use crate::caps::VmmCaps;
use crate::profile::Profile;

/// Lines of serial output and stderr kept for error messages.
const TAIL_LINES: usize = 20;
/// How often waits wake up to check for Ctrl-C and child exit.
const POLL: Duration = Duration::from_millis(100);

/// How to start guests: the binaries, extra `ksmvm run` flags, environment.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub ksmvm: PathBuf,
    pub probe: PathBuf,
    /// Added after the generated `ksmvm run` arguments.
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub caps: VmmCaps,
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
    pub fn command(&self, spec: &GuestSpec) -> Command {
        let mut cmd = Command::new(&self.ksmvm);
        cmd.arg("run")
            .arg("--kernel")
            .arg(&self.probe)
            .args(["--mem-mib", &spec.mem_mib.to_string()])
            .args(["--cmdline", &spec.cmdline])
            .args(["--name", &spec.name])
            .args(["--serial", "stdout"]);
        if let Some(initrd) = &spec.initrd {
            cmd.arg("--initrd").arg(initrd);
        }
        // Binaries whose --ksm is a flag always mark guest RAM mergeable;
        // their "KSM off" runs rely on ksmd being stopped instead.
        if self.caps.ksm_value {
            cmd.args(["--ksm", if spec.ksm { "on" } else { "off" }]);
        }
        cmd.args(&self.extra_args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// Makes `cmd` a child that cannot outlive the harness and that does not
/// receive the terminal's Ctrl-C itself (the harness stops it in order).
pub fn contain(cmd: &mut Command) {
    // SAFETY: prctl and getppid are async-signal-safe; the closure touches
    // no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() == 1 {
                return Err(io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
    cmd.process_group(0);
}

/// A line of serial output and when it arrived.
#[derive(Debug, Clone)]
pub struct SerialLine {
    pub at: Instant,
    pub text: String,
}

pub struct Guest {
    pub name: String,
    pub mem_mib: u64,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<SerialLine>,
    /// Just before spawn().
    pub spawned_at: Instant,
    first_byte: Arc<OnceLock<Instant>>,
    pub ready_at: Option<Instant>,
    /// The VMM's control API socket, if it has one.
    pub api_socket: Option<PathBuf>,
    serial_tail: VecDeque<String>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    exited: bool,
}

impl Guest {
    /// Starts `ksmvm run` for `spec`.
    pub fn spawn(launcher: &Launcher, spec: &GuestSpec) -> Result<Self> {
        let mut cmd = launcher.command(spec);
        let mut g = Self::spawn_command(&mut cmd, spec.name.clone(), spec.mem_mib)?;
        g.api_socket = launcher
            .api_dir
            .as_ref()
            .map(|d| d.join(format!("{}.sock", spec.name)));
        Ok(g)
    }

    /// Starts any VMM command whose stdout is the guest's serial console.
    pub fn spawn_command(cmd: &mut Command, name: String, mem_mib: u64) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        contain(cmd);
        let spawned_at = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
        let first_byte = Arc::new(OnceLock::new());
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout pipe"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr pipe"))?;
        let lines = read_serial(stdout, Arc::clone(&first_byte));
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        keep_tail(stderr, Arc::clone(&stderr_tail));
        Ok(Self {
            name,
            mem_mib,
            stdin: child.stdin.take(),
            child,
            lines,
            spawned_at,
            first_byte,
            ready_at: None,
            api_socket: None,
            serial_tail: VecDeque::new(),
            stderr_tail,
            exited: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the first byte of serial output arrived, if it has.
    pub fn first_byte_at(&self) -> Option<Instant> {
        self.first_byte.get().copied()
    }

    /// Waits for a serial line containing `needle`; fails on `PROBE ERROR`,
    /// on exit of the VMM, on timeout and on Ctrl-C.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<SerialLine> {
        let deadline = Instant::now() + timeout;
        loop {
            cancel::check()?;
            if let Some(line) = self.poll_line(needle)? {
                return Ok(line);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: no serial line containing {needle:?} within {timeout:?}{}",
                    self.name,
                    self.context()
                );
            }
            match self.lines.recv_timeout(POLL) {
                Ok(line) => {
                    if let Some(l) = self.take(line, needle)? {
                        return Ok(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    self.exited = true;
                    bail!(
                        "{}: the VMM exited ({}) before printing {needle:?}{}",
                        self.name,
                        status.map_or("unknown status".into(), |s| s.to_string()),
                        self.context()
                    );
                }
            }
        }
    }

    /// Drains lines already received; returns the first containing `needle`.
    fn poll_line(&mut self, needle: &str) -> Result<Option<SerialLine>> {
        while let Ok(line) = self.lines.try_recv() {
            if let Some(l) = self.take(line, needle)? {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }

    fn take(&mut self, line: SerialLine, needle: &str) -> Result<Option<SerialLine>> {
        push_tail(&mut self.serial_tail, line.text.clone());
        if line.text.starts_with("PROBE ERROR") && !needle.starts_with("PROBE ERROR") {
            bail!(
                "{}: the guest reported {:?}{}",
                self.name,
                line.text,
                self.context()
            );
        }
        Ok(line.text.contains(needle).then_some(line))
    }

    /// Waits for `PROBE READY` and records when it came.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Instant> {
        let line = self.wait_for("PROBE READY", timeout)?;
        self.ready_at = Some(line.at);
        Ok(line.at)
    }

    /// Sends one command line to the guest's serial input.
    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("{}: serial input already closed", self.name))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .with_context(|| format!("{}: writing to the serial input", self.name))
    }

    /// Whether the process has exited (reaps it if so).
    pub fn has_exited(&mut self) -> bool {
        if !self.exited {
            self.exited = matches!(self.child.try_wait(), Ok(Some(_)) | Err(_));
        }
        self.exited
    }

    /// Asks the guest to power off (without waiting).
    pub fn request_poweroff(&mut self) {
        if !self.has_exited() {
            // A guest that does not listen any more is killed later.
            let _ = self.send("poweroff");
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps it.
    pub fn terminate(&mut self, grace: Duration) {
        if self.has_exited() {
            return;
        }
        #[allow(
            clippy::cast_possible_wrap,
            reason = "pids are at most 2^22 (PID_MAX_LIMIT)"
        )]
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + grace;
        while !self.has_exited() && Instant::now() < end {
            thread::sleep(Duration::from_millis(5));
        }
        self.kill();
    }

    /// SIGKILL and reap; a no-op once it has exited.
    pub fn kill(&mut self) {
        if !self.has_exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.exited = true;
        }
    }

    /// Serial and stderr tails for error messages.
    pub fn context(&self) -> String {
        let stderr: Vec<String> = self
            .stderr_tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        let mut s = String::new();
        if !self.serial_tail.is_empty() {
            s.push_str("\n  serial: ");
            s.push_str(
                &self
                    .serial_tail
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n          "),
            );
        }
        if !stderr.is_empty() {
            s.push_str("\n  stderr: ");
            s.push_str(&stderr.join("\n          "));
        }
        s
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

fn push_tail(tail: &mut VecDeque<String>, line: String) {
    if tail.len() == TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line);
}

/// Reads the serial console: records the first byte's arrival and sends
/// whole lines, each stamped with its arrival time.
fn read_serial(
    mut out: impl Read + Send + 'static,
    first: Arc<OnceLock<Instant>>,
) -> Receiver<SerialLine> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let at = Instant::now();
            let _ = first.set(at);
            for &b in &buf[..n] {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string();
                    line.clear();
                    if tx.send(SerialLine { at, text }).is_err() {
                        return;
                    }
                } else {
                    line.push(b);
                }
            }
        }
        if !line.is_empty() {
            let text = String::from_utf8_lossy(&line).to_string();
            let _ = tx.send(SerialLine {
                at: Instant::now(),
                text,
            });
        }
    });
    rx
}

fn keep_tail(err: impl Read + Send + 'static, tail: Arc<Mutex<VecDeque<String>>>) {
    thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut t) = tail.lock() {
                push_tail(&mut t, line);
            }
        }
    });
}
