//! Every VMM thread runs under its own system-call filter (issue 13,
//! docs/security.md "Seccomp and privilege"), under real KVM with the probe
//! guest: each thread of a VM that used its disk, net, balloon, rng and API
//! shows `Seccomp: 2`; a thread of each kind that makes a forbidden call
//! (the debug-only KSMVM_DEBUG_SECCOMP_VIOLATE switch) ends the VMM, which
//! names the thread and the call; `off` and `log` say so at start.

use std::time::{Duration, Instant};

use ksmvm::api::Action;
use ksmvm_testkit::*;

const T: Duration = Duration::from_secs(60);
const GUEST_MAC: &str = "52:54:00:12:34:56";

/// Each thread's name and its `Seccomp:` mode (0 none, 2 filter).
fn seccomp_modes(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for (tid, comm) in ksmvm_testkit::proc::threads(pid).unwrap() {
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(u32::MAX);
        out.push((comm, mode));
    }
    out
}

/// A sparse raw image of `bytes` in `dir`.
fn sparse_disk(dir: &TempDir, bytes: u64) -> std::path::PathBuf {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(bytes))
        .unwrap();
    img
}

#[test]
fn every_thread_of_a_busy_vm_runs_under_a_filter() {
    if !have_tap() {
        return;
    }
    let dir = TempDir::new("seccomp");
    let img = sparse_disk(&dir, 8 << 20);
    let ns = NetNs::new("seccomp");
    ns.add_tap("stap0");
    let args = probe_args(
        "",
        &[
            "--name",
            "sc",
            "--mem-mib",
            "64",
            "--disk",
            &format!("path={}", img.display()),
            "--net",
            &format!("tap=stap0,mac={GUEST_MAC}"),
            "--balloon",
            "free-page-reporting=on",
        ],
    );
    let mut vm = Vmm::spawn_in_netns(&ns, &args);
    vm.expect_line("PROBE READY", T);
    // Every device's path once: block I/O, TAP frames, balloon, rng, API.
    let w = vm.command("blk-write 0 0 64 7", "PROBE BLK-WRITE");
    assert!(w.contains("status=ok"), "{w}");
    let r = vm.command("blk-read 0 0 64 7", "PROBE BLK-READ");
    assert!(r.contains("status=ok"), "{r}");
    let n = vm.command("net-send 0 50 128", "PROBE NET-SEND");
    assert!(n.contains("sent=50"), "{n}");
    let g = vm.command("rng 0 4096", "PROBE RNG");
    assert!(g.contains("bytes=4096"), "{g}");
    let api = vm.api("sc");
    api.set_balloon(8).unwrap();
    let b = vm.command("balloon", "PROBE BALLOON");
    assert!(b.contains("target_pages=2048"), "{b}");
    for action in [
        Action::Pause,
        Action::Resume,
        Action::KsmUnmerge,
        Action::KsmMerge,
    ] {
        api.action(action).unwrap();
    }
    api.stats().unwrap();
    api.metrics().unwrap();

    let modes = seccomp_modes(vm.pid());
    eprintln!("threads: {modes:?}");
    for want in [
        "vcpu0",
        "virtio-devices",
        "virtio-blk-io",
        "api",
        "api-worker",
    ] {
        assert!(
            modes.iter().any(|(c, _)| c == want),
            "no {want} thread: {modes:?}"
        );
    }
    for (comm, mode) in &modes {
        assert_eq!(*mode, 2, "thread {comm} has Seccomp: {mode}");
    }
    vm.poweroff();
}

/// Each filter's threads, made to break it, end the VMM (status 1) with a
/// message naming the thread and the call, within a bound.
#[test]
fn a_forbidden_call_in_any_thread_kind_ends_the_vmm_naming_it() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("seccomp-violate");
    let img = sparse_disk(&dir, 1 << 20);
    let disk = format!("path={}", img.display());
    for (kind, thread) in [
        ("main", "main"),
        ("vcpu", "vcpu0"),
        ("virtio-devices", "virtio-devices"),
        ("virtio-blk-io", "virtio-blk-io"),
        ("api", "api"),
    ] {
        let t0 = Instant::now();
        let mut vm = Launch::new(probe_args("", &["--mem-mib", "64", "--disk", &disk]))
            .env(ksmvm::seccomp::VIOLATE_ENV, kind)
            .start();
        let status = vm.wait_exit(T);
        let stderr = vm.stderr_text();
        eprintln!("{kind}: {status:?} after {:?}: {stderr}", t0.elapsed());
        assert_eq!(status.code(), Some(1), "{kind}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "seccomp: thread {thread} made a forbidden system call: personality (135)"
            )),
            "{kind}: {stderr}"
        );
    }
}

/// `off` runs unfiltered and `log` lets forbidden calls through, and both
/// warn at start; a bad mode is refused naming the flag.
#[test]
fn off_and_log_warn_and_a_bad_mode_is_refused() {
    if !have_kvm() {
        return;
    }
    for mode in ["off", "log"] {
        let mut vm = Launch::new(probe_args("", &["--mem-mib", "64", "--seccomp", mode]))
            .env(ksmvm::seccomp::VIOLATE_ENV, "vcpu")
            .start();
        vm.expect_line("PROBE READY", T);
        let modes = seccomp_modes(vm.pid());
        let want = if mode == "off" { 0 } else { 2 };
        for (comm, m) in &modes {
            assert_eq!(*m, want, "--seccomp {mode}: thread {comm} has Seccomp: {m}");
        }
        assert!(
            vm.stderr_text().contains(&format!("seccomp = {mode}")),
            "{}",
            vm.stderr_text()
        );
        vm.poweroff();
    }
    let out = std::process::Command::new(ksmvm())
        .args(probe_args("", &["--seccomp", "strict"]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--seccomp"), "{stderr}");
}

/// Every thread, once filtered, grows its heap by 8 MiB and frees it
/// (KSMVM_DEBUG_SECCOMP_CHURN, debug builds): the VM still boots, serves
/// its API and powers off cleanly. Before the VMM kept all threads in
/// glibc's main arena, a thread arena shrinking opened
/// /proc/sys/vm/overcommit_memory, and the first thread to free its heap
/// ended the VMM (a Linux guest's disk thread at its shutdown).
#[test]
fn filtered_threads_can_grow_and_free_their_heaps() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("seccomp-churn");
    let img = sparse_disk(&dir, 1 << 20);
    let mut vm = Launch::new(probe_args(
        "",
        &[
            "--name",
            "churn",
            "--mem-mib",
            "64",
            "--disk",
            &format!("path={}", img.display()),
        ],
    ))
    .env(ksmvm::seccomp::CHURN_ENV, "1")
    .start();
    vm.expect_line("PROBE READY", T);
    let w = vm.command("blk-write 0 0 64 3", "PROBE BLK-WRITE");
    assert!(w.contains("status=ok"), "{w}");
    vm.api("churn").stats().unwrap();
    let stderr = vm.stderr_text();
    assert!(!stderr.contains("seccomp"), "{stderr}");
    vm.poweroff();
}
