//! The real-Linux lane: unmodified Linux guests booted by ksmvm to user
//! space, with Linux's own drivers for every device. They need hardware
//! virtualisation: `make test-linux` runs each test in a fresh test host
//! (tests/testhost) on machines without vmx/svm, or directly on a host that
//! has them. Built only with the `real-linux` feature, so `make test` on
//! the development machine's emulating KVM does not build them.
//!
//! No test adds anything to the kernel command line: guests get ksmvm's
//! default (ksmvm::config::DEFAULT_CMDLINE) plus the virtio-mmio devices,
//! and the Mastodon guests the instance file's, as new-instance.sh writes it.

mod linux_guest;
#[path = "real_linux/mastodon.rs"]
mod mastodon;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use ksmvm::config::DEFAULT_CMDLINE;
use ksmvm::stats::ApproxF64;
use ksmvm_testkit::*;
use linux_guest::*;

const MIB: u64 = 1 << 20;
/// [`MIB`] as a buffer length.
const MIB_LEN: usize = 1 << 20;

/// Boots `kernel` with `vcpus` and `mem_mib`; checks the CPUs, memory and
/// command line the guest reports, then powers it off through ACPI.
fn boot_and_check(name: &str, kernel: Kernel, vcpus: u32, mem_mib: u64) {
    if !lane_ready(&kernel) {
        return;
    }
    let g = LinuxGuest::boot(
        name,
        &kernel,
        &[
            "--vcpus",
            &vcpus.to_string(),
            "--mem-mib",
            &mem_mib.to_string(),
        ],
    );
    assert_eq!(g.boot.nproc, vcpus, "{name}: CPUs the guest sees");
    let online = if vcpus == 1 {
        "0".to_string()
    } else {
        format!("0-{}", vcpus - 1)
    };
    assert_eq!(g.boot.online, online, "{name}: CPUs online");
    // The default entropy device is announced after the default options.
    assert_eq!(
        g.boot.cmdline,
        format!("{DEFAULT_CMDLINE} virtio_mmio.device=4K@0xc0000000:5"),
        "{name}: command line"
    );
    // MemTotal is RAM less what the kernel keeps for itself (its image,
    // page structs, reserved ranges): most of it, never more.
    let total = g.boot.memtotal_kb * 1024;
    assert!(
        total <= mem_mib * MIB && total >= mem_mib * MIB * 85 / 100,
        "{name}: MemTotal {} KiB for --mem-mib {mem_mib}",
        g.boot.memtotal_kb
    );
    // The kernel saw exactly the e820 map ksmvm built.
    let built: Vec<String> =
        g.vm.stderr_text()
            .lines()
            .filter_map(|l| {
                l.split_once(" e820 addr=")
                    .map(|(_, r)| kernel_e820_line(&format!("addr={r}")))
            })
            .collect();
    let seen: Vec<String> =
        g.vm.seen
            .iter()
            .filter_map(|l| {
                l.split_once("BIOS-e820: ")
                    .map(|(_, r)| format!("BIOS-e820: {r}"))
            })
            .filter(|l| l.ends_with("usable"))
            .collect();
    assert!(!built.is_empty(), "{name}: ksmvm logged no e820 entries");
    assert_eq!(seen, built, "{name}: e820 map");
    eprintln!(
        "{name}: booted to init in {:.1} s",
        g.booted_in.as_secs_f64()
    );
    let stderr = g.poweroff();
    assert!(stderr.contains("powered off"), "{name}: {stderr}");
}

#[test]
fn debian_standard_vmlinux_two_vcpus() {
    boot_and_check("std-elf-2cpu", Kernel::DebianStandard { elf: true }, 2, 512);
}

#[test]
fn debian_standard_bzimage_crosses_the_mmio_gap() {
    // 3.5 GiB: RAM below the 3 GiB gap and above 4 GiB.
    boot_and_check("std-bz-gap", Kernel::DebianStandard { elf: false }, 1, 3584);
}

#[test]
fn debian_cloud_vmlinux_two_vcpus_through_acpi() {
    // The cloud kernel has no MPPARSE: only the ACPI MADT names its CPUs
    // (and its IO-APIC: without it the kernel stalls in virtual-wire mode).
    boot_and_check("cloud-elf-2cpu", Kernel::DebianCloud { elf: true }, 2, 512);
}

#[test]
fn debian_cloud_bzimage_one_vcpu() {
    boot_and_check("cloud-bz-1cpu", Kernel::DebianCloud { elf: false }, 1, 512);
}

#[test]
fn ksmvm_kernel_two_vcpus() {
    boot_and_check("ksmvm-2cpu", Kernel::Ksmvm, 2, 256);
}

/// The guest writes a pattern with O_DIRECT and fsync, reads it back,
/// cannot write a read-only disk, and discard punches holes in the image;
/// /dev/hwrng delivers bytes from the virtio entropy device.
#[test]
fn block_and_rng_with_linux_drivers() {
    if !lane_ready(&Kernel::Ksmvm) {
        return;
    }
    let dir = TempDir::new("rl-blk");
    let rw = dir.join("rw.img");
    let ro = dir.join("ro.img");
    std::fs::File::create(&rw)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    std::fs::write(&ro, vec![0x5au8; MIB_LEN]).unwrap();
    let mut g = LinuxGuest::boot(
        "blk",
        &Kernel::Ksmvm,
        &[
            "--disk",
            &format!("path={},id=data", rw.display()),
            "--disk",
            &format!("path={},ro=on", ro.display()),
        ],
    );
    g.ok("yes ksmvm-block-pattern | head -c 4194304 >/tmp/p");
    g.ok("dd if=/tmp/p of=/dev/vda bs=1M count=4 oflag=direct conv=fsync 2>/dev/null");
    let sum: String =
        g.value("dd if=/dev/vda bs=1M count=4 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1");
    let written: String = g.value("md5sum /tmp/p | cut -d' ' -f1");
    let want = "ksmvm-block-pattern\n".repeat(4 * MIB_LEN / 20 + 1);
    let want = &want.as_bytes()[..4 * MIB_LEN];
    let on_disk = std::fs::read(&rw).unwrap();
    assert!(
        on_disk[..want.len()] == *want,
        "the host image holds the guest's bytes"
    );
    assert_eq!(sum.len(), 32, "md5 {sum}");
    assert_eq!(sum, written, "the guest reads back what it wrote");
    let blocks_written = std::fs::metadata(&rw).unwrap().blocks();
    assert!(blocks_written >= 4 * MIB / 512, "{blocks_written} blocks");

    // Read-only: the write fails in the guest, the image is untouched.
    let (rc, out) = g.sh("dd if=/tmp/p of=/dev/vdb bs=4096 count=1 oflag=direct conv=fsync 2>&1");
    assert_ne!(rc, 0, "a read-only disk accepted a write: {out:?}");
    assert_eq!(std::fs::read(&ro).unwrap(), vec![0x5au8; MIB_LEN]);
    assert_eq!(g.value::<String>("cat /sys/block/vdb/ro"), "1");

    // Discard punches holes in the host file.
    g.ok("blkdiscard -o 0 -l 4194304 /dev/vda");
    let blocks_after = std::fs::metadata(&rw).unwrap().blocks();
    assert!(
        blocks_after + 4 * MIB / 512 <= blocks_written,
        "discard left {blocks_after} of {blocks_written} blocks"
    );

    // Entropy from the virtio rng through Linux's hw_random core.
    let current: String = g.value("cat /sys/class/misc/hw_random/rng_current");
    assert!(current.starts_with("virtio_rng"), "{current}");
    let hex: String =
        g.value("echo $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')");
    assert_eq!(hex.len(), 128, "{hex}");
    assert_ne!(hex, "0".repeat(128));
    g.poweroff();
}

/// Twelve disks and the rng: the devices from the eleventh on sit on IRQs
/// 16 and up, which an ACPI kernel routes only for devices its DSDT names.
/// Every disk is there once, with its own bytes.
#[test]
fn twelve_disks_reach_the_irqs_beyond_the_isa_range() {
    if !lane_ready(&Kernel::Ksmvm) {
        return;
    }
    let dir = TempDir::new("rl-many");
    let mut extra = Vec::new();
    for i in 1..=12u8 {
        let img = dir.join(&format!("d{i}.img"));
        std::fs::write(&img, vec![i; MIB_LEN]).unwrap();
        extra.push("--disk".to_owned());
        extra.push(format!("path={},ro=on", img.display()));
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut g = LinuxGuest::boot("many", &Kernel::Ksmvm, &extra);
    let out = g.ok("for d in /sys/block/vd*; do echo disk $(od -An -tu1 -N1 /dev/${d##*/}); done");
    let mut firsts: Vec<u8> = out
        .iter()
        .filter_map(|l| l.strip_prefix("disk "))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    firsts.sort_unstable();
    assert_eq!(firsts, (1..=12).collect::<Vec<u8>>(), "{out:?}");
    let current: String = g.value("cat /sys/class/misc/hw_random/rng_current");
    assert!(current.starts_with("virtio_rng"), "{current}");
    let high: u32 = g.value("awk '$1+0 >= 16 && /virtio/' /proc/interrupts | wc -l");
    assert!(high >= 3, "devices on IRQs 16-18: {high}");
    let errors = g.ok("dmesg | grep -i virtio | grep -i -E 'error|fail|busy' || true");
    eprintln!("many: 12 disks and the rng bound; virtio errors in dmesg: {errors:?}");
    g.poweroff();
}

/// ping and a TCP transfer between the guest and a TAP in a network
/// namespace of the test's own, over IPv6 link-local addresses.
#[test]
fn net_ping_and_tcp_over_a_tap() {
    use std::io::Read;
    if !lane_ready(&Kernel::Ksmvm) {
        return;
    }
    let ns = NetNs::new("rlnet");
    ns.add_tap("ksmtap0");
    ns.ip(&["addr", "add", "fe80::1/64", "dev", "ksmtap0", "nodad"]);
    ns.ip(&["link", "set", "lo", "up"]);
    let args = guest_args(
        &Kernel::Ksmvm,
        &["--net", "tap=ksmtap0,mac=52:54:00:12:34:56"],
    );
    let mut g = LinuxGuest::spawn_until_init("net", || Vmm::spawn_in_netns(&ns, &args));
    g.ok("ip link set eth0 up && ip addr add fe80::2/64 dev eth0");
    // The address is usable once duplicate address detection is done.
    g.ok("for i in $(seq 1 30); do ip -6 addr show dev eth0 | grep -q tentative || break; sleep 1; done");
    let out = g.ok("ping -c 3 -w 30 -I eth0 fe80::1");
    assert!(
        out.iter().any(|l| l.contains("3 packets received")),
        "{out:#?}"
    );

    // A listener in the namespace: setns on a thread of its own.
    let nsfile = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread only, with a netns fd we opened.
        let rc = unsafe { libc::setns(nsfile.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0);
        let l = std::net::TcpListener::bind("[::]:5001").unwrap();
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let t0 = Instant::now();
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        (n, t0.elapsed())
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    g.ok("dd if=/dev/zero bs=1M count=64 2>/dev/null | nc fe80::1%eth0 5001");
    let (bytes, took) = server.join().unwrap();
    assert_eq!(bytes, 64 * MIB, "bytes received from the guest");
    eprintln!(
        "net: guest -> test host TCP {:.1} MiB/s ({} MiB in {:.2} s, under TCG emulation)",
        bytes.approx_f64() / MIB.approx_f64() / took.as_secs_f64(),
        bytes / MIB,
        took.as_secs_f64()
    );
    g.poweroff();
}

fn guest_rss(api: &ksmvm::api::ApiClient) -> u64 {
    api.stats().expect("GET /stats").guest_ram.rss
}

/// Waits until `f` holds, polling every 500 ms.
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Inflating the balloon takes memory from the guest and from the host's
/// guest-RAM Rss; deflating gives it back; the guest's statistics reach
/// /stats.
#[test]
fn balloon_inflate_deflate_and_stats() {
    if !lane_ready(&Kernel::Ksmvm) {
        return;
    }
    let mut g = LinuxGuest::boot(
        "balloon",
        &Kernel::Ksmvm,
        &[
            "--mem-mib",
            "512",
            "--balloon",
            "stats-interval-s=1",
            "--name",
            "bal",
        ],
    );
    let api = g.vm.api("bal");
    // Touch most of RAM so that the host has it resident, then free it.
    g.ok("dd if=/dev/zero of=/dev/shm/fill bs=1M count=300 2>/dev/null && rm /dev/shm/fill");
    let total0 = g.meminfo_kb("MemTotal");
    let rss0 = guest_rss(&api);
    api.set_balloon(128).expect("PUT /balloon");
    wait_for(
        "balloon inflated to 128 MiB",
        Duration::from_secs(60),
        || api.balloon().is_ok_and(|b| b.actual_mib >= 128),
    );
    let total1 = g.meminfo_kb("MemTotal");
    let rss1 = guest_rss(&api);
    assert!(
        total0 - total1 >= 120 * 1024,
        "MemTotal {total0} -> {total1} KiB"
    );
    assert!(rss0 >= rss1 + 100 * MIB, "guest RAM Rss {rss0} -> {rss1}");
    let stats = api.stats().unwrap();
    assert!(
        stats.balloon.is_some(),
        "no guest statistics in /stats: {stats:?}"
    );
    api.set_balloon(0).expect("PUT /balloon 0");
    wait_for("balloon deflated", Duration::from_secs(60), || {
        api.balloon().is_ok_and(|b| b.actual_mib == 0)
    });
    assert_eq!(g.meminfo_kb("MemTotal"), total0);
    g.poweroff();
}

/// With free page reporting the guest hands freed memory back: 256 MiB
/// allocated and freed in the guest leave the host's guest-RAM Rss.
#[test]
fn balloon_free_page_reporting() {
    if !lane_ready(&Kernel::Ksmvm) {
        return;
    }
    let mut g = LinuxGuest::boot(
        "fpr",
        &Kernel::Ksmvm,
        &[
            "--mem-mib",
            "512",
            "--balloon",
            "free-page-reporting=on",
            "--name",
            "fpr",
        ],
    );
    let api = g.vm.api("fpr");
    g.ok("dd if=/dev/zero of=/dev/shm/fill bs=1M count=256 2>/dev/null");
    let full = guest_rss(&api);
    g.ok("rm /dev/shm/fill");
    wait_for("freed pages reported", Duration::from_secs(90), || {
        guest_rss(&api) + 200 * MIB <= full
    });
    eprintln!(
        "fpr: guest RAM Rss {} -> {} MiB",
        full / MIB,
        guest_rss(&api) / MIB
    );
    g.poweroff();
}

/// SIGTERM → Ctrl-Alt-Del through the i8042 → init shuts down (syncing
/// the disk) → ACPI power-off → exit 0, well before the timeout.
#[test]
fn graceful_stop_through_ctrl_alt_del() {
    if !lane_ready(&Kernel::Ksmvm) {
        return;
    }
    let dir = TempDir::new("rl-stop");
    let img = dir.join("data.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let mut g = LinuxGuest::boot(
        "stop",
        &Kernel::Ksmvm,
        &[
            "--disk",
            &format!("path={}", img.display()),
            "--shutdown-timeout-s",
            "60",
        ],
    );
    // Buffered: only the guest's shutdown sync puts it on the disk.
    g.ok("echo ksmvm-graceful-stop-marker | dd of=/dev/vda bs=512 conv=sync 2>/dev/null");
    let t0 = Instant::now();
    g.vm.terminate();
    g.vm.expect_line_containing("KSMVM-T shutdown", Duration::from_secs(60));
    let (status, stderr) = g.vm.wait_keeping(Duration::from_secs(60));
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Ctrl-Alt-Del"), "{stderr}");
    assert!(
        !stderr.contains("did not shut down"),
        "timeout path taken: {stderr}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    eprintln!(
        "stop: SIGTERM to exit {:.1} s (the guest's own shutdown)",
        took.as_secs_f64()
    );
    let data = std::fs::read(&img).unwrap();
    assert!(
        data.starts_with(b"ksmvm-graceful-stop-marker\n"),
        "disk not flushed"
    );
}

/// A reboot in the guest and a guest kernel panic end the VMM with their
/// own exit statuses (3 and 4), so that the unit restarts a rebooted
/// instance and shows a panic as a failure.
#[test]
fn reboot_and_panic_exit_statuses() {
    if !lane_ready(&Kernel::Ksmvm) {
        return;
    }
    let g = LinuxGuest::boot("reboot", &Kernel::Ksmvm, &[]);
    let (status, stderr) = g.finish("reboot");
    assert_eq!(status.code(), Some(3), "reboot: {stderr}");
    assert!(stderr.contains("reset"), "{stderr}");
    // Busybox init execs its restart action (/bin/false) as PID 1 on
    // SIGQUIT; when it exits the kernel panics ("Attempted to kill init").
    let g = LinuxGuest::boot("panic", &Kernel::Ksmvm, &[]);
    let (status, stderr) = g.finish("kill -QUIT 1");
    assert_eq!(status.code(), Some(4), "panic: {stderr}");
    assert!(stderr.contains("panicked"), "{stderr}");
}

/// Three real guests that read the same 64 MiB from one shared read-only
/// disk into their page cache and tmpfs merge under the test host's KSM:
/// the API's merged pages (from /proc/PID/ksm_merging_pages on Linux 6.1)
/// become a large part of each guest's resident memory, the data stays
/// intact, and `ksmvm ksm status` agrees with sysfs.
#[test]
fn ksm_merges_three_real_guests() {
    if !lane_ready(&Kernel::Ksmvm) || !have_ksm() {
        return;
    }
    const DATA: u64 = 64 * MIB;
    // Pseudo-random, so that no two pages of one guest are alike: what
    // merges is what the guests share.
    let dir = TempDir::new("rl-ksm");
    let img = dir.join("shared.img");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..DATA / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&img, &bytes).unwrap();
    let disk = format!("path={},ro=on", img.display());
    let _lock = ksmvm::ksm::HostLock::acquire().expect("KSM host lock");
    let (ksm, _guard) = fast_ksm();
    let mut guests = Vec::new();
    // One at a time: concurrent boots are where the emulator is least
    // reliable (tests/testhost/README.md).
    for i in 0..3 {
        let name = format!("k{i}");
        let mut g = LinuxGuest::boot(
            &name,
            &Kernel::Ksmvm,
            &["--mem-mib", "384", "--name", &name, "--disk", &disk],
        );
        g.ok("cat /dev/vda >/dev/shm/data");
        guests.push(g);
    }
    let sums: Vec<String> = guests
        .iter_mut()
        .map(|g| g.value("md5sum /dev/shm/data | cut -d' ' -f1"))
        .collect();
    assert!(
        sums.iter().all(|s| *s == sums[0] && s.len() == 32),
        "{sums:?}"
    );
    let apis: Vec<_> = (0..3).map(|i| guests[i].vm.api(&format!("k{i}"))).collect();
    wait_for(
        "96 MiB merged in each guest",
        Duration::from_secs(300),
        || {
            apis.iter().all(|a| {
                a.stats()
                    .ok()
                    .and_then(|s| s.guest_ram.ksm)
                    .is_some_and(|m| m >= 80 * MIB)
            })
        },
    );
    for (i, a) in apis.iter().enumerate() {
        let s = a.stats().unwrap();
        let merged = s.guest_ram.ksm.unwrap();
        eprintln!(
            "k{i}: resident {} MiB, merged {} MiB ({:.0} %), effective {:?} MiB",
            s.guest_ram.rss / MIB,
            merged / MIB,
            s.merged_fraction.unwrap_or(0.0) * 100.0,
            s.effective_bytes.map(|b| b / MIB)
        );
        assert!(
            s.effective_bytes.is_some(),
            "no effective cost on this kernel: {s:?}"
        );
    }
    for (g, want) in guests.iter_mut().zip(&sums) {
        let now: String = g.value("md5sum /dev/shm/data | cut -d' ' -f1");
        assert_eq!(&now, want, "guest data changed after merging");
    }
    assert_ksm_status_matches_sysfs();
    drop(ksm);
    for g in guests {
        g.poweroff();
    }
}

/// `ksmvm ksm status` reports what the test host's sysfs says.
fn assert_ksm_status_matches_sysfs() {
    let out = std::process::Command::new(ksmvm())
        .args(["ksm", "status", "--json", "--window-ms", "0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sysfs = |k: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{k}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(
        report["settings"]["pages_to_scan"],
        sysfs("pages_to_scan"),
        "{report}"
    );
    let shared = report["counters"]["pages_shared"].as_u64().unwrap();
    assert!(
        shared > 0 && shared.abs_diff(sysfs("pages_shared")) < 2000,
        "{report}"
    );
}
