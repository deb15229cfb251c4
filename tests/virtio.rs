//! The virtio devices end to end: the probe guest's polling drivers against
//! ksmvm's virtio-mmio block, net, balloon and rng devices under real KVM.

use ksmvm_testkit::*;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);
const SECTOR: usize = 512;

/// The bytes the probe writes to `sector` with `seed`.
fn sector_bytes(seed: u64, sector: u64) -> Vec<u8> {
    let mut words = [0u64; probe_pattern::SECTOR_WORDS];
    probe_pattern::fill_sector(seed, sector, &mut words);
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[test]
fn block_write_flush_read_back_and_read_only_refusal() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("blk");
    let rw = dir.join("rw.img");
    let ro = dir.join("ro.img");
    std::fs::File::create(&rw)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    std::fs::write(&ro, vec![0xabu8; 1 << 20]).unwrap();
    let mut vm = Vmm::probe(
        "",
        &[
            "--mem-mib",
            "64",
            "--disk",
            &format!("path={},id=data", rw.display()),
            "--disk",
            &format!("path={},ro=on", ro.display()),
        ],
    );
    vm.expect_line("PROBE READY", T);
    let info = vm.command("blk-info 0", "PROBE BLK ");
    assert_eq!(field(&info, "capacity"), Some("8192"), "{info}");
    assert_eq!(field(&info, "ro"), Some("0"));
    assert_eq!(field(&info, "id"), Some("data"));
    let info = vm.command("blk-info 1", "PROBE BLK ");
    assert_eq!(field(&info, "ro"), Some("1"), "{info}");

    let w = vm.command("blk-write 0 100 24 7", "PROBE BLK-WRITE");
    assert_eq!(field(&w, "status"), Some("ok"), "{w}");
    let r = vm.command("blk-read 0 100 24 7", "PROBE BLK-READ");
    assert_eq!(field(&r, "status"), Some("ok"), "{r}");
    // After FLUSH the data is in the image file, exactly as the guest wrote it.
    let image = std::fs::read(&rw).unwrap();
    let expected: Vec<u8> = (100..124).flat_map(|s| sector_bytes(7, s)).collect();
    assert_eq!(&image[100 * SECTOR..124 * SECTOR], expected.as_slice());
    assert_eq!(
        hex_field(&r, "checksum"),
        probe_pattern::checksum_bytes(&expected)
    );

    // A read-only disk refuses writes with an I/O error and keeps its content.
    let w = vm.command("blk-write 1 0 8 1", "PROBE BLK-WRITE");
    assert_eq!(field(&w, "status"), Some("ioerr"), "{w}");
    assert!(std::fs::read(&ro).unwrap().iter().all(|&b| b == 0xab));
    // Requests beyond the end of the disk fail; the device keeps serving.
    let r = vm.command("blk-read 0 8190 4 7", "PROBE BLK-READ");
    assert_eq!(field(&r, "status"), Some("ioerr"), "{r}");
    let r = vm.command("blk-read 0 100 24 7", "PROBE BLK-READ");
    assert_eq!(field(&r, "status"), Some("ok"), "{r}");
    vm.poweroff();
}

#[test]
fn a_writable_disk_cannot_be_opened_by_two_vms() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("blklock");
    let img = dir.join("shared.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disk = format!("path={}", img.display());
    let mut first = Vmm::probe("", &["--mem-mib", "64", "--disk", &disk]);
    first.expect_line("PROBE READY", T);
    let second = Vmm::probe(
        "",
        &["--mem-mib", "64", "--disk", &disk, "--name", "second"],
    );
    let (status, stderr) = second.wait(T);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&img.display().to_string()), "{stderr}");
    assert!(
        stderr.contains(&first.pid().to_string()),
        "the holder's pid: {stderr}"
    );
    // Nor can a reader open it while a VM writes it.
    let reader = Vmm::probe(
        "",
        &[
            "--mem-mib",
            "64",
            "--disk",
            &format!("{disk},ro=on"),
            "--name",
            "r0",
        ],
    );
    let (status, stderr) = reader.wait(T);
    assert_eq!(status.code(), Some(2), "{stderr}");
    first.poweroff();
    // Read-only users share it (the shared root disk of many instances).
    let mut readers: Vec<Vmm> = (1..=2)
        .map(|i| {
            Vmm::probe(
                "",
                &[
                    "--mem-mib",
                    "64",
                    "--disk",
                    &format!("{disk},ro=on"),
                    "--name",
                    &format!("r{i}"),
                ],
            )
        })
        .collect();
    for vm in &mut readers {
        vm.expect_line("PROBE READY", T);
    }
    for vm in readers {
        vm.poweroff();
    }
}

#[test]
fn net_frames_cross_a_tap_device_both_ways() {
    if !have_tap() {
        return;
    }
    let ns = NetNs::new("net");
    ns.add_tap("ktap0");
    let sock = ns.packet_socket("ktap0");
    let mac = "52:54:00:12:34:56";
    let mut vm = Vmm::spawn_in_netns(
        &ns,
        &probe_args(
            "",
            &["--mem-mib", "64", "--net", &format!("tap=ktap0,mac={mac}")],
        ),
    );
    vm.expect_line("PROBE READY", T);
    let info = vm.command("net-info 0", "PROBE NET ");
    assert_eq!(field(&info, "mac"), Some(mac));

    // Guest to host: the probe's frames appear on the TAP.
    let sent = vm.command("net-send 0 20 600", "PROBE NET-SEND");
    assert_eq!(field(&sent, "sent"), Some("20"));
    let guest_mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen < 20 && Instant::now() < deadline {
        if let Some(f) = recv_frame(&sock, Duration::from_millis(500)) {
            if f.len() == 600 && f[6..12] == guest_mac && f[12..14] == [0x88, 0xb5] {
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 20, "frames from the guest seen on the TAP");

    // Host to guest and back: the probe echoes with MACs swapped.
    vm.command("net-echo 0 on", "PROBE NET-ECHO");
    let host_mac = [0x02, 0, 0, 0, 0, 0x01];
    let mut echoed = 0;
    for i in 0..50u64 {
        let mut frame = Vec::new();
        frame.extend_from_slice(&guest_mac);
        frame.extend_from_slice(&host_mac);
        frame.extend_from_slice(&[0x88, 0xb5]);
        frame.extend_from_slice(&i.to_le_bytes());
        frame.resize(128, 0x5a);
        send_frame(&sock, &frame);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match recv_frame(&sock, Duration::from_millis(200)) {
                Some(f)
                    if f[..6] == host_mac
                        && f[6..12] == guest_mac
                        && f[14..22] == i.to_le_bytes() =>
                {
                    echoed += 1;
                    break;
                }
                _ => {}
            }
        }
    }
    assert_eq!(echoed, 50, "echoed frames");
    let recv = vm.command("net-recv 0", "PROBE NET-RECV");
    assert!(
        field(&recv, "frames").unwrap().parse::<u64>().unwrap() >= 50,
        "{recv}"
    );
    vm.poweroff();
}

/// Guest RAM Rss through the API, in MiB.
fn rss_mib(vm: &Vmm, name: &str) -> u64 {
    vm.api(name).stats().expect("GET /stats").guest_ram.rss >> 20
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn balloon_and_free_page_reporting_return_memory_to_the_host() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vmm::probe(
        "probe.unique=32 probe.zero=48",
        &[
            "--mem-mib",
            "256",
            "--name",
            "bal",
            "--balloon",
            "free-page-reporting=on,stats-interval-s=1",
        ],
    );
    vm.expect_line("PROBE READY", T);
    let api = vm.api("bal");
    let touched = vm.command("touch 64", "PROBE TOUCH");
    assert_eq!(field(&touched, "pages"), Some("16384"));
    let before = rss_mib(&vm, "bal");
    assert!(before >= 32 + 48 + 64, "Rss {before} MiB");

    // Inflate by 64 MiB: the guest gives exactly the pages it touched last.
    api.set_balloon(64).expect("PUT /balloon");
    wait_for("the balloon to reach 64 MiB", || {
        api.balloon().unwrap().actual_mib == 64
    });
    let b = vm.command("balloon", "PROBE BALLOON");
    assert_eq!(field(&b, "actual"), Some("16384"), "{b}");
    let inflated = rss_mib(&vm, "bal");
    assert!(
        before - inflated >= 60,
        "inflating 64 MiB took Rss from {before} to {inflated} MiB"
    );

    // Free page reporting: 40 MiB of the touched zero region go back too.
    let r = vm.command("free-report 40", "PROBE FREE-REPORT");
    assert_eq!(field(&r, "status"), Some("ok"), "{r}");
    wait_for("reported memory to leave Rss", || {
        inflated - rss_mib(&vm, "bal") >= 36
    });
    assert!(api.balloon().unwrap().reported_bytes >= 40 << 20);

    // The guest's statistics join /stats.
    wait_for("guest memory statistics", || {
        api.stats()
            .unwrap()
            .balloon
            .is_some_and(|b| b.free_memory.is_some())
    });
    // Deflate: the guest may use the pages again; its data is intact.
    api.set_balloon(0).expect("PUT /balloon 0");
    wait_for("the balloon to deflate", || {
        api.balloon().unwrap().actual_mib == 0
    });
    let v = vm.command("verify", "PROBE VERIFY");
    assert_eq!(field(&v, "result"), Some("ok"), "{v}");
    // Errors: a target at or above guest RAM.
    assert!(api.set_balloon(256).is_err());
    vm.poweroff();
}

#[test]
fn rng_delivers_random_bytes() {
    if !have_kvm() {
        return;
    }
    let mut vm = Vmm::probe("", &["--mem-mib", "64"]);
    vm.expect_line("PROBE READY", T);
    let r = vm.command("rng 0 65536", "PROBE RNG");
    assert_eq!(field(&r, "bytes"), Some("65536"), "{r}");
    assert_eq!(field(&r, "distinct"), Some("256"), "{r}");
    vm.poweroff();
}
