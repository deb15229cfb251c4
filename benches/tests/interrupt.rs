//! Ctrl-C (SIGINT) stops every guest the harness started and restores every
//! KSM knob it changed; SIGKILL of the harness still takes its guests down.
//!
//! Needs /dev/kvm, root and KSM: without them the tests are skipped, or
//! fail when CI=true. They hold the cross-process KSM host lock and pass
//! `--assume-host-lock` to the harness they drive.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use ksmvm::ksm::{HostLock, Ksm};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BENCH: &str = env!("CARGO_BIN_EXE_ksmvm-bench");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// False (with a message) when a requirement is missing; panics in CI.
fn require(ok: bool, what: &str) -> bool {
    if !ok {
        assert!(
            !in_ci(),
            "CI=true and this test needs {what}, which is missing"
        );
        eprintln!("SKIPPED: this test needs {what}");
    }
    ok
}

fn have_all() -> bool {
    require(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "read/write access to /dev/kvm",
    ) && require(
        nix::unistd::geteuid().is_root() && Path::new("/sys/kernel/mm/ksm/run").exists(),
        "root and KSM (/sys/kernel/mm/ksm)",
    ) && require(
        ksmvm_bin().is_file(),
        "the ksmvm binary (cargo build --workspace)",
    )
}

/// The ksmvm binary of the same build (cargo test --workspace builds it).
fn ksmvm_bin() -> PathBuf {
    Path::new(BENCH).with_file_name("ksmvm")
}

fn probe() -> PathBuf {
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

struct Harness {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Harness {
    fn demo(hold_s: u64) -> Self {
        let mut child = Command::new(BENCH)
            .arg("demo")
            .arg("--ksmvm")
            .arg(ksmvm_bin())
            .arg("--probe")
            .arg(probe())
            .args(["--profile", "tiny", "--guests", "2", "--assume-host-lock"])
            .args(["--hold-s", &hold_s.to_string()])
            .current_dir(repo_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start ksmvm-bench");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    fn expect(&mut self, needle: &str, timeout: Duration) -> String {
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
                Err(e) => panic!("no line with {needle:?} ({e:?}); output: {:#?}", self.seen),
            }
        }
    }

    #[allow(
        clippy::cast_possible_wrap,
        reason = "pids are at most 2^22 (PID_MAX_LIMIT)"
    )]
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The guest pids from "all N guests READY in ... (pids A B)".
    fn guest_pids(line: &str) -> Vec<i32> {
        let inner = line
            .split("(pids ")
            .nth(1)
            .and_then(|s| s.strip_suffix(')'))
            .expect("pid list");
        inner
            .split_whitespace()
            .map(|p| p.parse().expect("pid"))
            .collect()
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("ksmvm-bench did not exit within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `pid` is still a ksmvm process.
fn is_ksmvm(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("ksmvm"))
        .unwrap_or(false)
}

fn wait_gone(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let alive: Vec<i32> = pids.iter().copied().filter(|&p| is_ksmvm(p)).collect();
        if alive.is_empty() || Instant::now() > deadline {
            return alive;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigint_stops_guests_and_restores_ksm() {
    if !have_all() {
        return;
    }
    let _lock = HostLock::acquire().expect("KSM host lock");
    let ksm = Ksm::new();
    // Restores the knobs even if this test fails half-way.
    let guard = ksm.settings_guard().expect("snapshot KSM settings");
    let before = guard.saved().clone();

    let mut h = Harness::demo(120);
    let ready = h.expect("guests READY", Duration::from_secs(60));
    let pids = Harness::guest_pids(&ready);
    assert_eq!(pids.len(), 2, "{ready}");
    h.expect("holding the guests", Duration::from_secs(90));
    let during = ksm.settings().expect("read KSM settings");
    assert_ne!(during, before, "the demo should have tuned KSM");
    assert!(
        pids.iter().all(|&p| is_ksmvm(p)),
        "guests run before SIGINT"
    );

    kill(h.pid(), Signal::SIGINT).expect("SIGINT");
    let status = h.wait(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(130),
        "exit status after SIGINT; output {:#?}",
        h.seen
    );
    assert_eq!(
        wait_gone(&pids, Duration::ZERO),
        Vec::<i32>::new(),
        "ksmvm left behind"
    );
    assert_eq!(
        ksm.settings().expect("read KSM settings"),
        before,
        "KSM knobs not restored"
    );
    guard.restore().expect("restore");
}

#[test]
fn sigkill_of_the_harness_takes_its_guests_down() {
    if !have_all() {
        return;
    }
    let _lock = HostLock::acquire().expect("KSM host lock");
    // SIGKILL cannot be caught: the harness restores nothing, this guard does.
    let guard = Ksm::new().settings_guard().expect("snapshot KSM settings");
    let mut h = Harness::demo(120);
    let ready = h.expect("guests READY", Duration::from_secs(60));
    let pids = Harness::guest_pids(&ready);
    kill(h.pid(), Signal::SIGKILL).expect("SIGKILL");
    h.wait(Duration::from_secs(10));
    // The harness could not remove its runtime directory (stale sockets).
    let _ =
        std::fs::remove_dir_all(std::env::temp_dir().join(format!("ksmvm-bench-demo-{}", h.pid())));
    assert_eq!(
        wait_gone(&pids, Duration::from_secs(5)),
        Vec::<i32>::new(),
        "guests outlived a SIGKILLed harness"
    );
    guard.restore().expect("restore");
}
