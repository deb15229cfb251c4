//! The probe guest boots through the Linux x86-64 boot protocol under real
//! KVM and reports what it received; guest failures become clear errors.

use ksmvm_testkit::*;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(60);

/// The e820 lines ksmvm logged, in the probe's line format.
fn vmm_e820(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| {
            l.split_once("e820 ")
                .map(|(_, rest)| format!("PROBE E820 {rest}"))
        })
        .collect()
}

#[test]
fn probe_receives_exact_cmdline_and_e820_map() {
    if !have_kvm() {
        return;
    }
    let cmdline = "console=ttyS0 reboot=k probe.then=poweroff probe.seed=7 quoted=\"a b\"";
    let mut vm = Vmm::spawn([
        "run",
        "--kernel",
        probe().to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--mem-mib",
        "96",
        "--rng",
        "off",
        "--log-level",
        "info",
    ]);
    let boot = vm.lines_until("PROBE READY", BOOT);
    let got_cmdline = boot
        .iter()
        .find_map(|l| l.strip_prefix("PROBE CMDLINE "))
        .expect("no PROBE CMDLINE line");
    assert_eq!(got_cmdline, cmdline);
    let count: usize = boot
        .iter()
        .find_map(|l| l.strip_prefix("PROBE E820 count="))
        .expect("no E820 count")
        .parse()
        .unwrap();
    let guest_e820: Vec<String> = boot
        .iter()
        .filter(|l| l.starts_with("PROBE E820 addr="))
        .cloned()
        .collect();
    let (status, stderr) = vm.wait(BOOT);
    assert!(status.success(), "exit {status:?}: {stderr}");
    let built = vmm_e820(&stderr);
    assert_eq!(
        guest_e820, built,
        "guest e820 differs from what ksmvm built"
    );
    assert_eq!(count, built.len());
    // The map covers exactly the guest RAM: 96 MiB minus the EBDA/ROM hole.
    let ram: u64 = guest_e820.iter().map(|l| hex_field(l, "size")).sum();
    assert_eq!(ram, (96 << 20) - (0x10_0000 - 0x9_fc00));
}

#[test]
fn virtio_devices_are_announced_on_the_command_line() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("cmdline-devices");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut vm = Vmm::probe(
        "probe.then=poweroff",
        &[
            "--mem-mib",
            "64",
            "--disk",
            &format!("path={},ro=on", disk.display()),
            "--balloon",
        ],
    );
    let line = vm.expect_line("PROBE CMDLINE", BOOT);
    // Disks first, then the balloon, then rng (on by default): one 4 KiB
    // window and one IRQ each, from the start of the MMIO gap and IRQ 5.
    assert_eq!(
        line,
        "PROBE CMDLINE console=ttyS0 probe.then=poweroff \
         virtio_mmio.device=4K@0xc0000000:5 \
         virtio_mmio.device=4K@0xc0001000:6 \
         virtio_mmio.device=4K@0xc0002000:7"
    );
    let (status, stderr) = vm.wait(BOOT);
    assert!(status.success(), "{stderr}");
}

#[test]
fn multi_vcpu_guest_sees_all_cpus_in_the_mp_table() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vmm::probe("probe.then=poweroff", &["--vcpus", "2", "--mem-mib", "64"]);
    let cpus = vm.expect_line("PROBE CPUS", BOOT);
    assert_eq!(field(&cpus, "count"), Some("2"));
    vm.expect_line("PROBE READY", BOOT);
    let (status, stderr) = vm.wait(BOOT);
    assert!(status.success(), "{stderr}");
}

#[test]
fn probe_memory_checksums_match_the_generator() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vmm::probe(
        "probe.shared=24 probe.unique=8 probe.zero=4 probe.profile=3 probe.seed=11",
        &["--mem-mib", "128"],
    );
    let fill = vm.expect_line("PROBE FILL", BOOT);
    assert_eq!(field(&fill, "shared_mib"), Some("24"));
    let sum = vm.expect_line("PROBE CHECKSUM", BOOT);
    let pages = |mib: u64| mib * 256;
    assert_eq!(
        hex_field(&sum, "shared"),
        probe_pattern::expected_checksum(probe_pattern::DOMAIN_SHARED, 3, pages(24))
    );
    assert_eq!(
        hex_field(&sum, "unique"),
        probe_pattern::expected_checksum(probe_pattern::DOMAIN_UNIQUE, 11, pages(8))
    );
    vm.expect_line("PROBE READY", BOOT);
    vm.send("verify");
    let verify = vm.expect_line("PROBE VERIFY", BOOT);
    assert_eq!(field(&verify, "result"), Some("ok"), "{verify}");
    assert_eq!(hex_field(&verify, "shared"), hex_field(&sum, "shared"));
    vm.send("poweroff");
    vm.expect_line("PROBE POWEROFF", BOOT);
    let (status, stderr) = vm.wait(BOOT);
    assert!(status.success(), "{stderr}");
}

/// Flags of the guest RAM mapping (the largest one) in /proc/PID/smaps.
fn guest_ram_vmflags(pid: u32, mem_bytes: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    in_guest = b - a == mem_bytes;
                    continue;
                }
            }
        }
        if in_guest {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().map(str::to_owned).collect();
            }
        }
    }
    panic!("no {mem_bytes}-byte mapping in /proc/{pid}/smaps");
}

#[test]
fn guest_ram_is_mergeable_only_with_ksm_on() {
    if !have_kvm() {
        return;
    }
    for (ksm, expect) in [("on", true), ("off", false)] {
        let mut vm = Vmm::probe("probe.shared=4", &["--mem-mib", "80", "--ksm", ksm]);
        vm.expect_line("PROBE READY", BOOT);
        let flags = guest_ram_vmflags(vm.pid(), 80 << 20);
        assert_eq!(
            flags.iter().any(|f| f == "mg"),
            expect,
            "--ksm {ksm}: {flags:?}"
        );
        vm.poweroff();
    }
}

#[test]
fn idle_probe_answers_serial_input_and_stops_on_sigterm() {
    if !have_kvm() {
        return;
    }
    // The probe ignores Ctrl-Alt-Del: SIGTERM stops it at once with 0.
    let mut vm = Vmm::probe("", &["--mem-mib", "64", "--shutdown-timeout-s", "0"]);
    vm.expect_line("PROBE READY", BOOT);
    vm.send("ping");
    vm.expect_line("PROBE PONG", BOOT);
    // An idle probe halts with interrupts on: its VMM must not burn CPU.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", vm.pid())).unwrap();
        let f: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cpu() - before;
    assert!(ticks <= 5, "idle probe used {ticks} ticks of CPU in 1 s");
    vm.terminate();
    let (status, stderr) = vm.wait(BOOT);
    assert!(
        status.success(),
        "SIGTERM should stop cleanly: {status:?} {stderr}"
    );
}

#[test]
fn a_paused_guest_runs_no_code_until_resumed() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vmm::probe(
        "",
        &[
            "--mem-mib",
            "64",
            "--vcpus",
            "2",
            "--shutdown-timeout-s",
            "0",
        ],
    );
    vm.expect_line("PROBE READY", BOOT);
    let api = vm.api("vm");
    // Pause returns once every vCPU has said it stopped running guest code.
    api.action(ksmvm::api::Action::Pause).expect("pause");
    assert_eq!(api.info().expect("info").state, ksmvm::api::VmState::Paused);
    // Input reaches the serial port, but nobody in the guest answers it.
    vm.send("ping");
    let early = vm.try_expect_line_containing("PROBE PONG", Duration::from_secs(2));
    assert!(early.is_err(), "a paused guest answered: {early:?}");
    api.action(ksmvm::api::Action::Resume).expect("resume");
    assert_eq!(
        api.info().expect("info").state,
        ksmvm::api::VmState::Running
    );
    vm.expect_line("PROBE PONG", BOOT);
    // Pausing twice and resuming twice are each answered (idempotent).
    api.action(ksmvm::api::Action::Pause).expect("pause");
    api.action(ksmvm::api::Action::Pause).expect("second pause");
    api.action(ksmvm::api::Action::Resume).expect("resume");
    api.action(ksmvm::api::Action::Resume)
        .expect("second resume");
    vm.command("ping", "PROBE PONG");
    // A stop while paused ends the VM cleanly.
    api.action(ksmvm::api::Action::Pause).expect("pause");
    vm.terminate();
    let (status, stderr) = vm.wait(BOOT);
    assert!(
        status.success(),
        "SIGTERM while paused: {status:?} {stderr}"
    );
}

/// Polls the VMM's stderr until it contains `needle`.
fn wait_stderr(vm: &mut Vmm, needle: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        let stderr = vm.stderr_text();
        if stderr.contains(needle) {
            return stderr;
        }
        assert!(
            Instant::now() < end,
            "no {needle:?} on stderr within {timeout:?}:\n{}",
            vm.context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM asks the guest to shut down; the probe ignores Ctrl-Alt-Del, so
/// the VM is stopped when shutdown_timeout_s runs out (exit 0). Without the
/// flag the timeout is 30 s, and a second SIGTERM stops the VM at once.
#[test]
fn sigterm_stops_a_guest_that_ignores_it_after_the_shutdown_timeout() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vmm::probe(
        "",
        &[
            "--mem-mib",
            "64",
            "--shutdown-timeout-s",
            "2",
            "--log-level",
            "info",
        ],
    );
    vm.expect_line("PROBE READY", BOOT);
    let t0 = Instant::now();
    vm.terminate();
    let (status, stderr) = vm.wait(BOOT);
    let took = t0.elapsed();
    assert!(status.success(), "{status:?} {stderr}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "SIGTERM to exit took {took:?}: {stderr}"
    );
    assert!(
        stderr.contains(
            "asking the guest to shut down (Ctrl-Alt-Del); stopping the VM in 2 s at the latest"
        ) && stderr.contains("the guest did not shut down within 2 s; stopping the VM"),
        "{stderr}"
    );

    let mut vm = Vmm::probe("", &["--mem-mib", "64", "--log-level", "info"]);
    vm.expect_line("PROBE READY", BOOT);
    vm.terminate();
    wait_stderr(&mut vm, "stopping the VM in 30 s at the latest", BOOT);
    let t0 = Instant::now();
    vm.terminate();
    let (status, stderr) = vm.wait(BOOT);
    assert!(status.success(), "{status:?} {stderr}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        stderr.contains("received SIGTERM, stopping the VM"),
        "{stderr}"
    );
}

/// On a pipe every guest line is marked `guest: `, so that no guest line can
/// pass for a VMM log line or carry a journald `<N>` priority of its own,
/// not even after a NUL (which ends a line for journald): the NUL ends the
/// marked line and what follows is marked too.
#[test]
fn guest_lines_on_stdout_are_marked_and_cannot_forge_priorities() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vmm::probe("", &["--mem-mib", "64"]);
    let ready = vm.try_expect("PROBE READY", BOOT).expect("PROBE READY");
    assert!(ready.marked, "{ready:?}");
    vm.send("\0<3>ksmvm: error: forged by the guest");
    // The probe echoes an unknown command: PROBE ERROR ... NUL <3>...
    let echo = vm
        .try_expect("PROBE ERROR unknown command", BOOT)
        .expect("the probe's answer");
    assert!(echo.marked, "{echo:?}");
    let forged = vm.try_expect("<3>", BOOT).expect("the line after the NUL");
    assert!(forged.marked, "{forged:?}");
    assert_eq!(forged.text, "<3>ksmvm: error: forged by the guest");
    assert!(
        !vm.stderr_text().contains("forged"),
        "guest output reached stderr"
    );
    vm.poweroff();
}

/// Serial output beyond --serial-rate-kib-s (after its burst) is dropped,
/// and the VMM says so on stderr with a count; the guest runs on.
#[test]
fn serial_output_beyond_the_rate_limit_is_dropped_and_reported() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vmm::probe(
        "",
        &[
            "--mem-mib",
            "64",
            "--serial-rate-kib-s",
            "1",
            "--serial-burst-kib",
            "1",
        ],
    );
    vm.expect_line("PROBE READY", BOOT);
    // 1000 answers of 11 bytes, far more than 1 KiB plus 1 KiB/s.
    let pings = vec!["ping"; 1000].join("\n");
    vm.send(&pings);
    wait_stderr(
        &mut vm,
        "serial: guest output is over its limit (1 KiB/s, burst 1 KiB); the excess is dropped",
        BOOT,
    );
    // Still answering, within the limit.
    std::thread::sleep(Duration::from_secs(2));
    vm.command("ping", "PROBE PONG");
    let pongs = vm.seen.iter().filter(|l| *l == "PROBE PONG").count();
    assert!(pongs < 1000, "{pongs} answers passed a 1 KiB/s limit");
    vm.send("poweroff");
    let (status, stderr) = vm.wait(BOOT);
    assert!(status.success(), "{status:?} {stderr}");
    // Started, then the count (every 10 s, and at exit): not one per drop.
    let warnings = stderr.matches("serial: ").count();
    assert!((2..=3).contains(&warnings), "{stderr}");
    let total = stderr
        .rsplit_once(" in all")
        .and_then(|(l, _)| l.rsplit_once("; "))
        .map(|(_, n)| n.parse::<u64>().unwrap())
        .unwrap_or_else(|| panic!("no count of dropped bytes:\n{stderr}"));
    assert!(total > 1000, "{total} bytes dropped:\n{stderr}");
}

#[test]
fn emulation_failure_is_a_clear_error() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vmm::probe("probe.fault=emulation", &["--mem-mib", "64"]);
    let (status, stderr) = vm_wait_fault(&mut vm);
    assert_eq!(status.code(), Some(1), "{stderr}");
    if stderr.contains("KVM_EXIT_INTERNAL_ERROR") {
        assert!(stderr.contains("emulation failure"), "{stderr}");
        assert!(stderr.contains("RIP 0x"), "{stderr}");
        assert!(
            stderr.contains("instruction bytes [f0 48 0f c7")
                || stderr.contains("instruction bytes [f0 0f c7"),
            "{stderr}"
        );
    } else {
        // On hardware KVM the instruction simply runs; the probe then reports
        // that it survived and powers off with an error line.
        assert!(
            vm.seen.iter().any(|l| l.contains("PROBE ERROR")),
            "{stderr}"
        );
    }
}

fn vm_wait_fault(vm: &mut Vmm) -> (std::process::ExitStatus, String) {
    // A guest fault must end the VMM, never hang it.
    vm.wait_keeping(BOOT)
}

#[test]
fn triple_fault_is_a_clear_error() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vmm::probe("probe.fault=triple", &["--mem-mib", "64"]);
    let (status, stderr) = vm_wait_fault(&mut vm);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("triple fault"), "{stderr}");
}

/// Runs the probe, sends `command` once it is READY and returns the VMM's
/// exit code and stderr.
fn probe_command_exit(command: &str) -> (Option<i32>, String) {
    let mut vm = Vmm::probe("", &["--mem-mib", "64", "--log-level", "info"]);
    vm.expect_line("PROBE READY", BOOT);
    vm.send(command);
    let (status, stderr) = vm.wait(BOOT);
    (status.code(), stderr)
}

#[test]
fn acpi_poweroff_exits_0() {
    if !have_kvm() {
        return;
    }
    let (code, stderr) = probe_command_exit("poweroff");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("the guest powered off"), "{stderr}");
}

#[test]
fn guest_reset_exits_3() {
    if !have_kvm() {
        return;
    }
    let (code, stderr) = probe_command_exit("reset");
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("the guest reset (reboot)"), "{stderr}");
}

#[test]
fn guest_panic_exits_4_even_though_a_reset_follows() {
    if !have_kvm() {
        return;
    }
    let (code, stderr) = probe_command_exit("panic");
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("the guest kernel panicked"), "{stderr}");
    // It ended at the reset, not after the grace period.
    assert!(!stderr.contains("did not reset within"), "{stderr}");
}
