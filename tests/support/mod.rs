//! Helpers for the end-to-end tests: they run the real `ksmvm` binary
//! against /dev/kvm with the project's probe guest (or a real Linux kernel).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const KSMVM: &str = env!("CARGO_BIN_EXE_ksmvm");

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns false (and says why) when a requirement is missing outside CI;
/// in CI a missing requirement fails the test instead.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("CI=true and this test needs {what}, which is missing on this machine");
    }
    eprintln!("SKIPPED: this test needs {what}");
    false
}

pub fn have_kvm() -> bool {
    require(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "read/write access to /dev/kvm",
    )
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn have_ksm() -> bool {
    require(
        is_root() && Path::new("/sys/kernel/mm/ksm/run").exists(),
        "root and KSM (/sys/kernel/mm/ksm)",
    )
}

/// Builds the probe guest once per test process (cargo serialises
/// concurrent builds of the same target directory itself).
pub fn probe() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let dir = repo_root().join("guest-image/probe");
            let status = Command::new("cargo")
                .args(["build", "--release", "--quiet"])
                .current_dir(&dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("CARGO_BUILD_TARGET")
                .status()
                .expect("cannot run cargo to build the probe guest");
            assert!(status.success(), "building the probe guest failed");
            dir.join("target/release/probe")
        })
        .clone()
}

/// A running ksmvm process; killed on drop so a failing test leaves nothing behind.
pub struct Vmm {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Receiver<String>,
    /// Every serial line seen so far.
    pub seen: Vec<String>,
    /// Its private KSMVM_RUNTIME_DIR (API socket), see [`runtime_dir`].
    pub runtime: TempDir,
}

/// A private runtime directory for one ksmvm process, so that its API
/// socket (NAME.sock, default name "vm") never meets another test's VM or
/// the host's /run/ksmvm.
pub fn runtime_dir() -> TempDir {
    TempDir::new("run")
}

impl Vmm {
    pub fn spawn<I, S>(args: I) -> Vmm
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let runtime = runtime_dir();
        let mut child = Command::new(KSMVM)
            .args(args)
            .env("KSMVM_RUNTIME_DIR", &runtime.0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start ksmvm");
        let lines = pipe_lines(child.stdout.take().expect("stdout"));
        let stderr = pipe_lines(child.stderr.take().expect("stderr"));
        Vmm {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            seen: Vec::new(),
            runtime,
        }
    }

    /// Boots the probe with the given extra command line and VMM flags.
    pub fn probe(cmdline: &str, extra: &[&str]) -> Vmm {
        let probe = probe();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            probe.display().to_string(),
            "--cmdline".into(),
            format!("console=ttyS0 {cmdline}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Vmm::spawn(args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a serial line starting with `prefix` and returns it.
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with("PROBE ERROR") && !prefix.starts_with("PROBE ERROR") {
                        panic!("probe reported an error: {l}\nserial so far: {:#?}", self.seen);
                    }
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no serial line starting with {prefix:?} within {timeout:?}; serial: {:#?}\nstderr: {}",
                    self.seen,
                    self.stderr_text()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "ksmvm closed its output before {prefix:?}; status {:?}; serial: {:#?}\nstderr: {}",
                    self.child.try_wait(),
                    self.seen,
                    self.stderr_text()
                ),
            }
        }
    }

    /// Waits for a serial line containing `needle` (kernel logs carry a
    /// timestamp prefix) and returns it.
    pub fn expect_line_containing(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(e) => panic!(
                    "no serial line containing {needle:?} ({e:?}); serial: {:#?}\nstderr: {}",
                    self.seen,
                    self.stderr_text()
                ),
            }
        }
    }

    /// Collects serial lines until one starts with `last`, inclusive.
    pub fn lines_until(&mut self, last: &str, timeout: Duration) -> Vec<String> {
        let start = self.seen.len();
        self.expect_line(last, timeout);
        self.seen[start..].to_vec()
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .expect("cannot write to the guest's serial input");
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    /// Waits for the VMM to exit; returns its status and everything it wrote to stderr.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait for ksmvm") {
                // The reader threads end with the process; drain what is left.
                std::thread::sleep(Duration::from_millis(50));
                for l in self.lines.try_iter() {
                    self.seen.push(l);
                }
                return (st, self.stderr_text());
            }
            if Instant::now() > deadline {
                panic!(
                    "ksmvm did not exit within {timeout:?}; serial: {:#?}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn pipe_lines<R: std::io::Read + Send + 'static>(r: R) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs ksmvm to completion with the given args and no stdin; returns
/// (exit code, stdout, stderr).
pub fn run_to_end(args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let runtime = runtime_dir();
    let mut child = Command::new(KSMVM)
        .args(args)
        .env("KSMVM_RUNTIME_DIR", &runtime.0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ksmvm");
    let out = pipe_lines(child.stdout.take().expect("stdout"));
    let err = pipe_lines(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ksmvm {args:?} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(20));
    let collect = |rx: Receiver<String>| rx.iter().collect::<Vec<_>>().join("\n");
    (status.code(), collect(out), collect(err))
}

/// A private temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ksmvm-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Parses `key=value` fields of a probe line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

pub fn hex_field(line: &str, key: &str) -> u64 {
    let v = field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    u64::from_str_radix(v.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("{key}={v} is not hex in {line:?}"))
}
