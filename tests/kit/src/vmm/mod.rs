//! The one launcher: [`Launch`] describes a VMM process (ksmvm by default:
//! its arguments, environment, runtime directory, network namespace) and
//! starts it as a [`Vmm`], whose stdout is the guest's serial console.
//!
//! The tests and the benchmarks used to have launchers of their own; where
//! they differed, the kit keeps one behaviour that serves both:
//!
//! * Serial output is read as raw bytes (invalid UTF-8 is replaced, not an
//!   end of output); every line is kept in [`Vmm::seen`] and stamped with
//!   its arrival time, and the first byte's arrival is recorded (the boot
//!   benchmark's figure). ksmvm marks each guest line on a stdout that is
//!   not a terminal with `guest: `; the kit takes the marker off (the
//!   guest's text is what tests match) and says in [`SerialLine::marked`]
//!   that it was there.
//! * stderr is always captured (the whole of it, [`Vmm::stderr_text`]);
//!   [`Launch::echo_stderr`] also copies it to this process's stderr.
//!   [`Vmm::log_text`] is stderr then the serial lines, for VMMs started
//!   with `--serial none` whose log is all on stderr.
//! * Every wait fails on a serial line starting with `PROBE ERROR` unless it
//!   waits for one, whether it matches prefixes or substrings (a Linux
//!   guest never prints such a line, so its waits are unaffected).
//! * Waits come in two kinds: `expect_*` panic with the serial and stderr
//!   so far (tests), `try_*` return a [`WaitError`] (benches, and tests that
//!   tell a timeout from an exit).
//! * The process is contained: it gets SIGKILL when the thread that started
//!   it exits (PR_SET_PDEATHSIG; a harness killed outright leaves no VMM
//!   behind) and runs in a process group of its own (the terminal's Ctrl-C
//!   reaches only the harness, which stops its VMMs in order). It is killed
//!   and reaped on drop, also when a test panics.
//! * Unless told otherwise, a VMM gets a private runtime directory
//!   ([`RuntimeDir`]) that lives as long as it does.

mod launch;
mod output;

pub use launch::{contain, Launch};
pub use output::{SerialLine, WaitError, GUEST_LINE_PREFIX};

use std::ffi::OsStr;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use ksmvm::api::ApiClient;
use ksmvm::instance::socket_path_in;

use crate::dirs::RuntimeDir;
use crate::net::NetNs;

use output::{read_serial, read_stderr, Pattern};

/// How often interruptible waits look at their interrupt flag.
const POLL: Duration = Duration::from_millis(100);
/// Lines of serial output and stderr in [`Vmm::context`].
const TAIL_LINES: usize = 20;
/// How long, after the process exited, its output pipes may take to drain.
const DRAIN: Duration = Duration::from_secs(1);
/// The timeout of [`Vmm::command`] and [`Vmm::poweroff`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A running VMM with its serial console on a pipe; killed and reaped on
/// drop, so a failing test leaves nothing behind.
#[derive(Debug)]
pub struct Vmm {
    child: Child,
    stdin: Option<ChildStdin>,
    /// In a mutex only so that a `&Vmm` may be shared between threads
    /// (clients of one VM's API); only `&mut self` methods read it.
    lines: Mutex<Receiver<SerialLine>>,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_done: Arc<AtomicBool>,
    /// Every serial line seen so far.
    pub seen: Vec<String>,
    spawned_at: Instant,
    first_byte: Arc<OnceLock<Instant>>,
    status: Option<ExitStatus>,
    /// Its KSMVM_RUNTIME_DIR, if the kit set one.
    runtime: Option<PathBuf>,
    own_runtime: Option<RuntimeDir>,
}

impl Vmm {
    /// Starts ksmvm with `args` and a private runtime directory.
    ///
    /// # Panics
    /// When ksmvm cannot be started.
    pub fn spawn<I, S>(args: I) -> Vmm
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Launch::new(args).start()
    }

    /// Boots the probe with the given extra command line and VMM flags.
    pub fn probe(cmdline: &str, extra: &[&str]) -> Vmm {
        Vmm::spawn(crate::probe_args(cmdline, extra))
    }

    /// Runs ksmvm inside a network namespace (for TAP devices that live there).
    pub fn spawn_in_netns(ns: &NetNs, args: &[String]) -> Vmm {
        Launch::new(args).netns(ns).start()
    }

    /// Like [`spawn_in_netns`](Self::spawn_in_netns), with extra
    /// environment (e.g. NOTIFY_SOCKET).
    pub fn spawn_in_netns_with_env(ns: &NetNs, args: &[String], env: &[(&str, &Path)]) -> Vmm {
        env.iter()
            .fold(Launch::new(args).netns(ns), |l, (k, v)| l.env(k, v))
            .start()
    }

    /// Starts any command whose stdout is the guest's serial console
    /// (stdin, stdout and stderr become pipes), contained (see the module
    /// documentation).
    pub fn spawn_command(cmd: &mut Command, echo_stderr: bool) -> io::Result<Vmm> {
        Vmm::spawn_with(cmd, true, echo_stderr)
    }

    fn spawn_with(cmd: &mut Command, stdin: bool, echo_stderr: bool) -> io::Result<Vmm> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        contain(cmd);
        let spawned_at = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot start {:?}: {e}", cmd.get_program()),
                ))
            }
        };
        let missing = || io::Error::other("no pipe to the child");
        let stdout = child.stdout.take().ok_or_else(missing)?;
        let stderr_pipe = child.stderr.take().ok_or_else(missing)?;
        let first_byte = Arc::new(OnceLock::new());
        let lines = read_serial(stdout, Arc::clone(&first_byte));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_done = Arc::new(AtomicBool::new(false));
        read_stderr(
            stderr_pipe,
            Arc::clone(&stderr),
            Arc::clone(&stderr_done),
            echo_stderr,
        );
        Ok(Vmm {
            stdin: child.stdin.take(),
            child,
            lines: Mutex::new(lines),
            stderr,
            stderr_done,
            seen: Vec::new(),
            spawned_at,
            first_byte,
            status: None,
            runtime: None,
            own_runtime: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Just before the process was started.
    pub fn spawned_at(&self) -> Instant {
        self.spawned_at
    }

    /// When the first byte of serial output arrived, if it has.
    pub fn first_byte_at(&self) -> Option<Instant> {
        self.first_byte.get().copied()
    }

    /// Its KSMVM_RUNTIME_DIR (private unless [`Launch::runtime_dir`] gave
    /// one).
    ///
    /// # Panics
    /// For a VMM started with [`Launch::inherit_runtime_dir`].
    pub fn runtime_dir(&self) -> &Path {
        self.runtime
            .as_deref()
            .expect("this VMM was started without a runtime directory of the kit's")
    }

    /// The kit's runtime directory of this VMM, if it has one.
    pub fn try_runtime_dir(&self) -> Option<&Path> {
        self.runtime.as_deref()
    }

    /// The default API socket of VM `name` in its runtime directory.
    pub fn socket(&self, name: &str) -> PathBuf {
        socket_path_in(self.runtime_dir(), name)
    }

    /// A client for this VM's control API (the VM is named `name`).
    pub fn api(&self, name: &str) -> ApiClient {
        ApiClient::new(self.socket(name))
    }

    /// Waits for a serial line matching `pattern`, waking every 100 ms to
    /// ask `interrupted`.
    fn wait_line(
        &mut self,
        pattern: Pattern<'_>,
        timeout: Duration,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<SerialLine, WaitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if interrupted() {
                return Err(WaitError::Interrupted);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.receiver().recv_timeout(left.min(POLL)) {
                Ok(line) => {
                    self.seen.push(line.text.clone());
                    if line.text.starts_with("PROBE ERROR") && !pattern.wants_probe_error() {
                        return Err(WaitError::ProbeError(line.text));
                    }
                    if pattern.matches(&line.text) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) if left.is_zero() => return Err(WaitError::Timeout),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(WaitError::Exited(self.reap(DRAIN)));
                }
            }
        }
    }

    /// Waits for a serial line starting with `prefix`.
    pub fn try_expect(&mut self, prefix: &str, timeout: Duration) -> Result<SerialLine, WaitError> {
        self.wait_line(Pattern::Prefix(prefix), timeout, &mut || false)
    }

    /// Waits for a serial line containing `needle`; `interrupted` is asked
    /// every 100 ms (a harness's Ctrl-C flag).
    pub fn try_expect_containing_until(
        &mut self,
        needle: &str,
        timeout: Duration,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<SerialLine, WaitError> {
        self.wait_line(Pattern::Contains(needle), timeout, interrupted)
    }

    /// Like [`Vmm::expect_line_containing`], telling a timeout from an
    /// ended VMM instead of panicking.
    pub fn try_expect_line_containing(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, WaitError> {
        self.wait_line(Pattern::Contains(needle), timeout, &mut || false)
            .map(|l| l.text)
    }

    /// Panics with the VMM's stderr and the last serial lines: the cause
    /// first, since a CI log keeps only part of a long message (the whole
    /// serial log goes to the test's artefacts where it has them).
    fn fail(&mut self, pattern: Pattern<'_>, timeout: Duration, e: &WaitError) -> ! {
        panic!(
            "no serial line {pattern} within {timeout:?} ({e}); {} serial lines, the last:{}",
            self.seen.len(),
            self.context()
        )
    }

    /// Waits for a serial line starting with `prefix` and returns it.
    ///
    /// # Panics
    /// On timeout, exit, or a `PROBE ERROR` line (unless `prefix` asks for
    /// one), with the serial and stderr so far.
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let p = Pattern::Prefix(prefix);
        match self.wait_line(p, timeout, &mut || false) {
            Ok(l) => l.text,
            Err(e) => self.fail(p, timeout, &e),
        }
    }

    /// Waits for a serial line containing `needle` (kernel logs carry a
    /// timestamp prefix) and returns it.
    ///
    /// # Panics
    /// As [`Vmm::expect_line`].
    pub fn expect_line_containing(&mut self, needle: &str, timeout: Duration) -> String {
        let p = Pattern::Contains(needle);
        match self.wait_line(p, timeout, &mut || false) {
            Ok(l) => l.text,
            Err(e) => self.fail(p, timeout, &e),
        }
    }

    /// Collects serial lines until one starts with `last`, inclusive.
    pub fn lines_until(&mut self, last: &str, timeout: Duration) -> Vec<String> {
        let start = self.seen.len();
        self.expect_line(last, timeout);
        self.seen[start..].to_vec()
    }

    /// Sends one line to the guest's serial input.
    pub fn try_send(&mut self, line: &str) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stdin closed"))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
    }

    /// Like [`Vmm::try_send`], for tests.
    ///
    /// # Panics
    /// When the serial input is closed.
    pub fn send(&mut self, line: &str) {
        self.try_send(line)
            .unwrap_or_else(|e| panic!("cannot write to the guest's serial input: {e}"));
    }

    /// Closes the guest's serial input.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Sends a serial command and returns the answer line (starting with
    /// `answer`).
    pub fn try_command(
        &mut self,
        cmd: &str,
        answer: &str,
        timeout: Duration,
    ) -> Result<String, WaitError> {
        self.try_send(cmd)?;
        self.try_expect(answer, timeout).map(|l| l.text)
    }

    /// Sends a serial command and returns the probe's answer line.
    pub fn command(&mut self, cmd: &str, answer: &str) -> String {
        self.send(cmd);
        self.expect_line(answer, COMMAND_TIMEOUT)
    }

    /// Everything the VMM wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join("\n")
    }

    /// stderr, then the serial lines seen: the whole log of a VMM started
    /// with `--serial none`.
    pub fn log_text(&mut self) -> String {
        self.drain_lines();
        let mut s = self.stderr_text();
        for l in &self.seen {
            s.push('\n');
            s.push_str(l);
        }
        s
    }

    /// The last lines of stderr and serial output, for error messages.
    pub fn context(&self) -> String {
        let tail = |v: &[String]| v[v.len().saturating_sub(TAIL_LINES)..].join("\n          ");
        let mut s = String::new();
        let stderr = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        if !stderr.is_empty() {
            s.push_str("\n  stderr: ");
            s.push_str(&tail(&stderr));
        }
        if !self.seen.is_empty() {
            s.push_str("\n  serial: ");
            s.push_str(&tail(&self.seen));
        }
        s
    }

    fn receiver(&mut self) -> &Receiver<SerialLine> {
        self.lines.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves serial lines already received into `seen`.
    fn drain_lines(&mut self) {
        while let Ok(l) = self.receiver().try_recv() {
            self.seen.push(l.text);
        }
    }

    /// Its exit status once it exited (reaps it); None while it runs.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(st) => self.status = st,
                // Not our child any more (cannot happen while we hold it):
                // treat it as gone.
                Err(_) => return None,
            }
        }
        self.status
    }

    /// Whether the process has exited (reaps it if so).
    pub fn has_exited(&mut self) -> bool {
        self.try_status().is_some() || self.child.try_wait().is_err()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// After the exit: lets the reader threads finish (they end with the
    /// process's pipes) and moves what is left into `seen`.
    fn drain_after_exit(&mut self) {
        let deadline = Instant::now() + DRAIN;
        while let Ok(l) = self
            .receiver()
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(l.text);
        }
        while !self.stderr_done.load(Ordering::SeqCst) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `timeout` for the VMM to exit; None if it still runs.
    pub fn try_wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let st = self.reap(timeout)?;
        self.drain_after_exit();
        Some(st)
    }

    /// Waits for the VMM to exit by itself, keeping the handle.
    ///
    /// # Panics
    /// When it still runs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.try_wait_exit(timeout) {
            Some(st) => st,
            None => panic!(
                "process {} still running after {timeout:?}; log:\n{}",
                self.pid(),
                self.log_text()
            ),
        }
    }

    /// Waits for the VMM to exit; returns its status and everything it
    /// wrote to stderr.
    ///
    /// # Panics
    /// As [`Vmm::wait_exit`].
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        self.wait_keeping(timeout)
    }

    /// Like `wait`, keeping the handle (for `seen`).
    ///
    /// # Panics
    /// As [`Vmm::wait_exit`].
    pub fn wait_keeping(&mut self, timeout: Duration) -> (ExitStatus, String) {
        match self.try_wait_exit(timeout) {
            Some(st) => (st, self.stderr_text()),
            None => panic!(
                "ksmvm did not exit within {timeout:?}; serial: {:#?}",
                self.seen
            ),
        }
    }

    /// Asks the probe to power off and checks that the VMM exits cleanly.
    ///
    /// # Panics
    /// When it does not exit, or exits with an error.
    pub fn poweroff(mut self) {
        self.send("poweroff");
        let (status, stderr) = self.wait_keeping(COMMAND_TIMEOUT);
        assert!(status.success(), "ksmvm exit {status:?}: {stderr}");
    }

    /// Sends `sig` (the child is not reaped while we hold it, so its pid
    /// cannot have been reused).
    pub fn signal(&self, sig: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, sig) };
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps it.
    pub fn stop(&mut self, grace: Duration) {
        if self.has_exited() {
            return;
        }
        self.terminate();
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
            if let Ok(st) = self.child.wait() {
                self.status = Some(st);
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs ksmvm to completion with the given args and stdin closed; returns
/// (exit code, stdout, stderr).
///
/// # Panics
/// When ksmvm cannot be started or runs past `timeout`.
pub fn run_to_end(args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let mut vm = Vmm::spawn(args);
    vm.close_stdin();
    let (status, stderr) = vm.wait_keeping(timeout);
    (status.code(), vm.seen.join("\n"), stderr)
}
