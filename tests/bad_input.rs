//! Bad input gets one clear error line naming the cause and exit status 2,
//! never a panic or a hang.

use ksmvm_testkit::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Runs `ksmvm run ARGS` and checks exit status 2 and a one-line error
/// containing `needle`.
fn refused(args: &[&str], needle: &str) {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    let (code, _out, err) = run_to_end(&full, T);
    assert_eq!(code, Some(2), "ksmvm {full:?} should exit 2; stderr: {err}");
    assert!(
        err.contains(needle),
        "stderr of {full:?} lacks {needle:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line: {err}");
}

#[test]
fn missing_unreadable_or_wrong_kernel() {
    if !have_kvm() {
        return;
    }
    refused(
        &["--kernel", "/nonexistent/vmlinux"],
        "cannot open kernel /nonexistent/vmlinux",
    );
    let dir = TempDir::new("badkernel");
    refused(
        &["--kernel", dir.path().to_str().unwrap()],
        "cannot open kernel",
    );
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    refused(
        &["--kernel", junk.to_str().unwrap()],
        "neither an ELF vmlinux nor a bzImage",
    );
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    refused(
        &["--kernel", empty.to_str().unwrap()],
        "neither an ELF vmlinux nor a bzImage",
    );
    // An ELF header with nothing behind it.
    let truncated = dir.join("truncated");
    std::fs::write(&truncated, b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0").unwrap();
    refused(
        &["--kernel", truncated.to_str().unwrap()],
        "could not be loaded",
    );
}

#[test]
fn initrd_that_does_not_fit_or_is_missing() {
    if !have_kvm() {
        return;
    }
    let probe = probe();
    let dir = TempDir::new("initrd");
    let big = dir.join("big.img");
    // A sparse 40 MiB file for a 32 MiB guest.
    std::fs::File::create(&big)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    refused(
        &[
            "--kernel",
            probe.to_str().unwrap(),
            "--mem-mib",
            "32",
            "--initrd",
            big.to_str().unwrap(),
        ],
        "does not fit",
    );
    refused(
        &[
            "--kernel",
            probe.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        "cannot open initrd /nonexistent/initrd",
    );
}

#[test]
fn command_line_too_long_or_not_ascii() {
    if !have_kvm() {
        return;
    }
    let probe = probe();
    let long = "x".repeat(4096);
    refused(
        &[
            "--kernel",
            probe.to_str().unwrap(),
            "--rng",
            "off",
            "--cmdline",
            &long,
        ],
        "command line is 4097 bytes, the limit is 2048",
    );
    refused(
        &[
            "--kernel",
            probe.to_str().unwrap(),
            "--cmdline",
            "caf\u{e9}",
        ],
        "invalid kernel command line",
    );
}

#[test]
fn memory_and_vcpu_limits() {
    if !have_kvm() {
        return;
    }
    let probe = probe();
    let k = probe.to_str().unwrap();
    refused(&["--kernel", k, "--mem-mib", "4"], "too small");
    refused(&["--kernel", k, "--mem-mib", "2000000"], "too large");
    refused(&["--kernel", k, "--vcpus", "0"], "at least one vCPU");
    refused(
        &["--kernel", k, "--vcpus", "100000"],
        "KVM on this host allows at most",
    );
    refused(&["--kernel", k, "--name", "../etc"], "invalid VM name");
    refused(&["--kernel", k, "--serial", "tty"], "invalid serial sink");
    refused(
        &["--kernel", k, "--mem-mib", "lots"],
        "invalid value 'lots'",
    );
}

/// MemTotal + SwapTotal of this host in MiB, read here rather than through
/// the VMM's own probe, so that the test checks the VMM against the host.
fn host_ram_and_swap_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (kib("MemTotal:") + kib("SwapTotal:")) >> 10
}

/// The host's online CPUs (`0-3,6` counts 5).
fn online_cpus() -> u32 {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("online CPUs");
    list.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((lo, hi)) => hi.parse::<u32>().unwrap() - lo.parse::<u32>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

#[test]
fn a_guest_larger_than_the_host_needs_allow_overcommit() {
    if !have_kvm() {
        return;
    }
    let host_mib = host_ram_and_swap_mib();
    assert!(host_mib > 0, "no MemTotal in /proc/meminfo");
    let twice = (2 * host_mib).to_string();
    // Above 1 TiB the memory layout's own bound would answer first.
    if !require(
        2 * host_mib <= 1 << 20,
        "a host below 512 GiB of RAM + swap",
    ) {
        return;
    }
    let probe = probe();
    let k = probe.to_str().unwrap();
    refused(
        &["--kernel", k, "--mem-mib", &twice],
        &format!(
            "--mem-mib: guest memory of {twice} MiB is more than this host can ever back: {host_mib} MiB"
        ),
    );
    let cpus = online_cpus();
    let too_many = (cpus + 1).to_string();
    refused(
        &["--kernel", k, "--vcpus", &too_many],
        &format!("--vcpus: {too_many} vCPUs requested, but this host has {cpus} online CPUs"),
    );
    // With the flag the same guest boots (guest RAM is reserved lazily, and
    // the probe touches only a few MiB of it) and powers off.
    let mut vm = Vmm::probe(
        "probe.then=poweroff",
        &["--mem-mib", &twice, "--allow-overcommit"],
    );
    vm.expect_line("PROBE READY", T);
    let (status, stderr) = vm.wait(T);
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(!stderr.contains("can ever back"), "{stderr}");
}

#[test]
fn kvm_missing_or_not_permitted() {
    if !have_kvm() || !require(is_root(), "root (to hide /dev/kvm and drop privileges)") {
        return;
    }
    let probe = probe();
    let ksmvm = ksmvm();
    // A private mount namespace with an empty /dev: /dev/kvm is missing.
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {} run --kernel {}",
            ksmvm.display(),
            probe.display()
        ))
        .output()
        .expect("run unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot open /dev/kvm") && err.contains("No such file"),
        "{err}"
    );

    // An unprivileged user may not open it.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(ksmvm)
        .args(["run", "--kernel"])
        .arg(&probe)
        .output()
        .expect("run setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot open /dev/kvm") && err.contains("ermission denied"),
        "{err}"
    );
}
