//! Real Linux guests for tests/real_linux.rs: where the kernels and the test
//! initramfs are cached, and a guest driven over its serial console.
//!
//! The initramfs (guest-image/linux/make-test-initramfs.sh) runs busybox
//! init; its /etc/rc prints `KSMVM-T boot ...`, `KSMVM-T cmdline ...` and
//! `KSMVM-T ready`, then runs every line it reads from the console with
//! eval and answers `KSMVM-T rc=N`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use ksmvm_testkit::*;

/// Real Linux boots in ~5-30 s in the test host; allow for a loaded machine.
pub const BOOT_LIMIT: Duration = Duration::from_secs(240);
pub const CMD_LIMIT: Duration = Duration::from_secs(120);

pub fn cache() -> PathBuf {
    match std::env::var_os("KSMVM_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/ksmvm"),
    }
}

/// The kernels of the lane, as `make test-linux` prepares them.
pub enum Kernel {
    /// Debian's standard kernel (the test host's own), ELF or bzImage.
    DebianStandard { elf: bool },
    /// Debian's cloud kernel (no MPPARSE: CPUs only through ACPI).
    DebianCloud { elf: bool },
    /// The project's guest kernel (guest-image/kernel): virtio-mmio from
    /// the command line, i8042, ACPI, pvpanic, all built in.
    Ksmvm,
}

impl Kernel {
    pub fn path(&self) -> PathBuf {
        let c = cache();
        match self {
            Kernel::DebianStandard { elf: true } => c.join("testhost/current/vmlinux"),
            Kernel::DebianStandard { elf: false } => c.join("testhost/current/vmlinuz"),
            Kernel::DebianCloud { elf: true } => c.join("linux/vmlinux"),
            Kernel::DebianCloud { elf: false } => c.join("linux/vmlinuz"),
            Kernel::Ksmvm => c.join("kernel/current/vmlinux"),
        }
    }
}

pub fn initramfs() -> PathBuf {
    cache().join("linux/test-initramfs.cpio.gz")
}

/// Whether this machine can run the lane: hardware virtualisation (in the
/// test host, or a vmx/svm host), root, and the prepared kernels.
pub fn lane_ready(kernel: &Kernel) -> bool {
    have_kvm()
        && require(
            hardware_virt(),
            "hardware virtualisation (vmx/svm in /proc/cpuinfo): run it with `make test-linux`, which uses the test host",
        )
        && require(is_root(), "root")
        && require(
            kernel.path().is_file() && initramfs().is_file(),
            &format!(
                "{} and {} (`make test-linux` prepares them)",
                kernel.path().display(),
                initramfs().display()
            ),
        )
}

/// The test host's early guest fault (../shared/MACHINE.md; docs/testing.md
/// has the rates seen here): KVM_EXIT_SHUTDOWN with the vCPU at the reset
/// vector (SVM resets the vCPU on a shutdown intercept, so the real RIP is
/// lost), before the guest's init runs.
pub fn is_test_host_fault(stderr: &str) -> bool {
    stderr.contains("triple fault") && stderr.contains("at RIP 0xfff0")
}

/// The file that tells the test-host runner to run a test once more on a
/// fresh test host (`ksmvm_testhost::FAULT_MARKER`; the vmm crate does not
/// depend on the runner's).
const TEST_HOST_FAULT_MARKER: &str = "TEST-HOST-FAULT";

/// Keeps a copy of a guest's serial log where the test-host runner keeps
/// the artefacts of failed tests.
pub fn keep_artefact(name: &str, text: &str) {
    if let Some(dir) = std::env::var_os("KSMVM_ARTEFACTS") {
        let _ = std::fs::write(Path::new(&dir).join(name), text);
    }
}

/// What the guest's init reported at boot.
#[derive(Debug, Default)]
pub struct BootInfo {
    pub nproc: u32,
    pub online: String,
    pub memtotal_kb: u64,
    pub cmdline: String,
}

pub struct LinuxGuest {
    pub vm: Vmm,
    pub boot: BootInfo,
    pub booted_in: Duration,
    name: String,
}

/// `ksmvm run` arguments for `kernel` with the test initramfs.
pub fn guest_args(kernel: &Kernel, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        kernel.path().display().to_string(),
        "--initrd".into(),
        initramfs().display().to_string(),
        // The VMM's account of why the guest stopped is part of what the
        // tests check.
        "--log-level".into(),
        "info".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl LinuxGuest {
    /// Boots `kernel` with the test initramfs and waits for its init.
    pub fn boot(name: &str, kernel: &Kernel, extra: &[&str]) -> LinuxGuest {
        let args = guest_args(kernel, extra);
        LinuxGuest::spawn_until_init(name, || Vmm::spawn(&args))
    }

    /// Starts a guest with `spawn` and waits for its init.
    pub fn spawn_until_init(name: &str, spawn: impl Fn() -> Vmm) -> LinuxGuest {
        let start = Instant::now();
        let (mut vm, line) = spawn_until_line(name, "KSMVM-T boot ", BOOT_LIMIT, spawn);
        let mut boot = BootInfo::default();
        for kv in line.split_whitespace() {
            match kv.split_once('=') {
                Some(("nproc", v)) => boot.nproc = v.parse().unwrap_or(0),
                Some(("online", v)) => boot.online = v.to_owned(),
                Some(("memtotal_kb", v)) => boot.memtotal_kb = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        let line = vm.expect_line_containing("KSMVM-T cmdline ", CMD_LIMIT);
        boot.cmdline = line
            .split_once("KSMVM-T cmdline ")
            .map(|(_, c)| c.trim().to_owned())
            .unwrap_or_default();
        vm.expect_line_containing("KSMVM-T ready", CMD_LIMIT);
        let booted_in = start.elapsed();
        eprintln!(
            "{name}: init reached in {:.1} s: {boot:?}",
            booted_in.as_secs_f64()
        );
        LinuxGuest {
            vm,
            boot,
            booted_in,
            name: name.to_owned(),
        }
    }

    /// A guest whose console already speaks the test protocol (the Mastodon
    /// image's test console): waits for its `KSMVM-T ready`.
    pub fn attach(name: &str, mut vm: Vmm, limit: Duration) -> LinuxGuest {
        let start = Instant::now();
        vm.expect_line_containing("KSMVM-T ready", limit);
        LinuxGuest {
            vm,
            boot: BootInfo::default(),
            booted_in: start.elapsed(),
            name: name.to_owned(),
        }
    }

    /// Runs one shell line in the guest; returns its exit status and the
    /// lines it printed.
    pub fn sh(&mut self, line: &str) -> (i32, Vec<String>) {
        self.vm.send(line);
        let start = self.vm.seen.len();
        let end = match self.vm.try_expect_line_containing("KSMVM-T rc=", CMD_LIMIT) {
            Ok(end) => end,
            Err(e) => self.stalled(line, &e),
        };
        let rc = end
            .split_once("KSMVM-T rc=")
            .and_then(|(_, r)| r.trim().parse().ok())
            .unwrap_or(-1);
        // A console that still echoes would repeat the line itself.
        let out = self.vm.seen[start..self.vm.seen.len() - 1]
            .iter()
            .filter(|l| l.as_str() != line)
            .cloned()
            .collect();
        (rc, out)
    }

    /// Fails the test for a command the guest never answered, with what
    /// the VMM says of its devices and serial port at that moment (a guest
    /// that stalled on its disk shows requests `in_flight`, one that never
    /// got the command shows nothing new read), then the usual context.
    fn stalled(&mut self, line: &str, e: &ksmvm_testkit::vmm::WaitError) -> ! {
        let sockets = self
            .vm
            .try_runtime_dir()
            .and_then(|dir| std::fs::read_dir(dir).ok())
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let state = match sockets.first() {
            Some(sock) => match ksmvm_testkit::api::stats_json(&ksmvm::api::ApiClient::new(sock)) {
                Ok(v) => format!("devices {} serial {}", v["devices"], v["serial"]),
                Err(e) => format!("no /stats: {e}"),
            },
            None => "no API socket".to_owned(),
        };
        panic!(
            "guest {}: no answer to `{line}` within {CMD_LIMIT:?} ({e}); the VMM says: {state};{}",
            self.name,
            self.vm.context()
        )
    }

    /// Like [`sh`](Self::sh), asserting success.
    pub fn ok(&mut self, line: &str) -> Vec<String> {
        let (rc, out) = self.sh(line);
        assert_eq!(rc, 0, "`{line}` failed in guest {}: {out:#?}", self.name);
        out
    }

    /// The first line `line` printed, parsed.
    pub fn value<T: std::str::FromStr>(&mut self, line: &str) -> T {
        let out = self.ok(line);
        out.iter()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("`{line}` printed no value: {out:?}"))
    }

    pub fn meminfo_kb(&mut self, field: &str) -> u64 {
        self.value(&format!("awk '/^{field}:/ {{print $2}}' /proc/meminfo"))
    }

    /// Sends a line the guest will not answer (it powers off, reboots,
    /// panics) and waits for the VMM to exit.
    pub fn finish(mut self, line: &str) -> (ExitStatus, String) {
        self.vm.send(line);
        let r = self.vm.wait_keeping(CMD_LIMIT);
        keep_artefact(
            &format!("{}.serial.log", self.name),
            &self.vm.seen.join("\n"),
        );
        r
    }

    /// Powers the guest off through ACPI and checks that the VMM exits 0.
    pub fn poweroff(self) -> String {
        let name = self.name.clone();
        let (status, stderr) = self.finish("poweroff");
        assert_eq!(status.code(), Some(0), "{name}: poweroff: {stderr}");
        stderr
    }
}

/// Starts a guest with `spawn` and waits for its first serial line that
/// contains `needle`. A guest that stops with the test host's known early
/// fault (a triple fault at the reset vector, tests/testhost/README.md)
/// before that line fails the test with the test-host runner's marker in
/// its artefacts, so that the runner runs the test once more on a fresh
/// test host (printed); directly on a vmx/svm host, and for any other
/// failure, the test just fails.
pub fn spawn_until_line(
    name: &str,
    needle: &str,
    limit: Duration,
    spawn: impl Fn() -> Vmm,
) -> (Vmm, String) {
    let mut vm = spawn();
    match vm.try_expect_line_containing(needle, limit) {
        Ok(line) => (vm, line),
        Err(e) => boot_failed(name, needle, &mut vm, &format!("{e:?}")),
    }
}

/// Fails a test whose guest never printed `needle`, keeping its serial log;
/// for the test host's known early fault it also leaves the runner's
/// marker (see [`spawn_until_line`]).
pub fn boot_failed(name: &str, needle: &str, vm: &mut Vmm, why: &str) -> ! {
    let serial = vm.seen.join("\n");
    let (status, stderr) = vm.wait_keeping(CMD_LIMIT);
    keep_artefact(&format!("{name}.serial.log"), &serial);
    if is_test_host_fault(&stderr) {
        let fault = format!(
            "{name}: {} before `{needle}`",
            stderr.lines().last().unwrap_or_default()
        );
        keep_artefact(TEST_HOST_FAULT_MARKER, &fault);
        eprintln!("{name}: TEST-HOST FAULT ({fault})");
    }
    // The whole serial log is in the artefacts; a CI log keeps only part
    // of a long message.
    panic!(
        "{name}: no `{needle}` ({why}); ksmvm {status:?}:{}",
        vm.context()
    );
}

impl Drop for LinuxGuest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            keep_artefact(
                &format!("{}.serial.log", self.name),
                &self.vm.seen.join("\n"),
            );
        }
    }
}
