//! What a test needs from the machine, and the CI rule: with `CI=true` (or
//! `CI=1`) a missing requirement fails the test, elsewhere the test is
//! skipped (it returns early) after saying what it needs.

use std::path::Path;

/// Whether this runs under CI (`CI=true` or `CI=1`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns false (and says why) when a requirement is missing outside CI;
/// in CI a missing requirement fails the test instead.
///
/// # Panics
/// Under CI, when `ok` is false.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    assert!(
        !in_ci(),
        "CI=true and this test needs {what}, which is missing on this machine"
    );
    eprintln!("SKIPPED: this test needs {what}");
    false
}

/// Read/write access to /dev/kvm (see [`require`]).
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

/// Whether this process runs as root (not a requirement by itself: combine
/// it with [`require`]).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// /dev/kvm, root and /dev/net/tun, as the TAP tests need (see [`require`]).
pub fn have_tap() -> bool {
    have_kvm()
        && require(
            is_root() && Path::new("/dev/net/tun").exists(),
            "root and /dev/net/tun",
        )
}

/// Root and the KSM sysfs knobs (see [`require`]).
pub fn have_ksm() -> bool {
    require(
        is_root() && Path::new("/sys/kernel/mm/ksm/run").exists(),
        "root and KSM (/sys/kernel/mm/ksm)",
    )
}

/// Whether this host's CPU has hardware virtualisation (vmx or svm), as
/// real hosts and the test host (tests/testhost) do.
pub fn hardware_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}
