//! Ctrl-C (SIGINT) stops every guest the harness started and restores every
//! KSM knob it changed; SIGKILL of the harness still takes its guests down.
//!
//! Needs /dev/kvm, root and KSM: without them the tests are skipped, or
//! fail when CI=true. They hold the cross-process KSM host lock and pass
//! `--assume-host-lock` to the harness they drive.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use ksmvm::ksm::{HostLock, Ksm};
use ksmvm_testkit::{have_ksm, have_kvm, probe, repo_root, require, Launch, Vmm};

const BENCH: &str = env!("CARGO_BIN_EXE_ksmvm-bench");

fn have_all() -> bool {
    have_kvm()
        && have_ksm()
        && require(
            ksmvm_bin().is_file(),
            "the ksmvm binary (cargo build --workspace)",
        )
}

/// The ksmvm binary of the same build (cargo test --workspace builds it).
fn ksmvm_bin() -> PathBuf {
    Path::new(BENCH).with_file_name("ksmvm")
}

/// `ksmvm-bench demo`, started by the kit's launcher (its stdout is read
/// as the kit reads a serial console; stderr is shown).
struct Harness {
    vmm: Vmm,
}

impl Harness {
    fn demo(hold_s: u64) -> Self {
        let vmm = Launch::program(BENCH)
            .arg("demo")
            .arg("--ksmvm")
            .arg(ksmvm_bin())
            .arg("--probe")
            .arg(probe())
            .args(["--profile", "tiny", "--guests", "2", "--assume-host-lock"])
            .args(["--hold-s", &hold_s.to_string()])
            .current_dir(repo_root())
            .inherit_runtime_dir()
            .stdin_closed()
            .echo_stderr()
            .start();
        Self { vmm }
    }

    fn expect(&mut self, needle: &str, timeout: Duration) -> String {
        self.vmm.expect_line_containing(needle, timeout)
    }

    fn pid(&self) -> u32 {
        self.vmm.pid()
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
        self.vmm.wait_exit(timeout)
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

    h.vmm.signal(libc::SIGINT);
    let status = h.wait(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(130),
        "exit status after SIGINT; output {:#?}",
        h.vmm.seen
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
    h.vmm.kill();
    h.wait(Duration::from_secs(10));
    // The harness could not remove its runtime directory (stale sockets):
    // ksmvm_testkit::RuntimeDir's `ksmvm-bench-demo-PID-N`.
    let prefix = format!("ksmvm-bench-demo-{}-", h.pid());
    for e in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    assert_eq!(
        wait_gone(&pids, Duration::from_secs(5)),
        Vec::<i32>::new(),
        "guests outlived a SIGKILLed harness"
    );
    guard.restore().expect("restore");
}
