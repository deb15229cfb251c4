//! `probe.image=initrd`: the probe replays a `KSMVMRAM` memory image that
//! ksmvm loads verbatim as the initrd (`ksmvm run --initrd PACK`).

use std::time::{Duration, Instant};

use ksmvm::ksm::HostLock;
use ksmvm_testkit::*;
use probe_pattern::pack::SyntheticPack;
use probe_pattern::{expected_checksum, DOMAIN_SHARED, DOMAIN_UNIQUE};

const BOOT: Duration = Duration::from_secs(60);

fn dec(line: &str, key: &str) -> u64 {
    field(line, key)
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key}= is not decimal in {line:?}"))
}

/// Boots the probe with `pack` as its initrd.
fn boot_with_pack(dir: &TempDir, pack: &SyntheticPack, cmdline: &str, mem_mib: u64) -> Vmm {
    let path = dir.join("image.ksmvmram");
    write_pack(&path, pack);
    Vmm::probe(
        cmdline,
        &[
            "--mem-mib",
            &mem_mib.to_string(),
            "--initrd",
            path.to_str().unwrap(),
            "--rng",
            "off",
        ],
    )
}

#[test]
fn image_is_replayed_next_to_the_regions_and_verifies() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("image");
    let pack = SyntheticPack {
        shared: 700,
        unique: 300,
        zero: 1000,
        key: 11,
    };
    let mut vm = boot_with_pack(
        &dir,
        &pack,
        "probe.image=initrd probe.shared=2 probe.unique=1 probe.zero=1 probe.profile=4 probe.seed=42",
        96,
    );
    // The regions' lines are exactly what they are without an image.
    let fill = vm.expect_line("PROBE FILL", BOOT);
    assert_eq!(fill, "PROBE FILL shared_mib=2 unique_mib=1 zero_mib=1");
    let sums = vm.expect_line("PROBE CHECKSUM", BOOT);
    assert_eq!(
        hex_field(&sums, "shared"),
        expected_checksum(DOMAIN_SHARED, 4, 512)
    );
    assert_eq!(
        hex_field(&sums, "unique"),
        expected_checksum(DOMAIN_UNIQUE, 42, 256)
    );
    let image = vm.expect_line("PROBE IMAGE", BOOT);
    assert_eq!(
        (
            dec(&image, "pages"),
            dec(&image, "shared"),
            dec(&image, "unique"),
            dec(&image, "zero")
        ),
        (1000, 700, 300, 1000),
        "{image}"
    );
    assert_eq!(field(&image, "zero_wanted"), None, "{image}");
    // The guest sees the pack's bytes exactly, with its seed in its own pages.
    assert_eq!(hex_field(&image, "checksum"), pack.expected_checksum(42));
    vm.expect_line("PROBE READY", BOOT);

    let v = vm.command("verify", "PROBE VERIFY");
    assert_eq!(field(&v, "result"), Some("ok"), "{v}");
    assert_eq!(field(&v, "image"), Some("ok"), "{v}");
    assert_eq!(
        hex_field(&v, "shared"),
        expected_checksum(DOMAIN_SHARED, 4, 512)
    );
    // The pool's pages (what the balloon and `touch` use) are not the
    // initrd's: touching all of them leaves the image intact.
    let t = vm.command("touch 1000", "PROBE TOUCH");
    assert!(dec(&t, "pages") > 0, "{t}");
    let v = vm.command("verify", "PROBE VERIFY");
    assert_eq!(field(&v, "image"), Some("ok"), "{v}");
    vm.poweroff();
}

#[test]
fn without_an_image_verify_has_no_image_field() {
    if !have_kvm() {
        return;
    }
    // An initrd that is not a pack is ignored without probe.image, and kept
    // out of the workload pool.
    let dir = TempDir::new("image-none");
    let path = dir.join("initrd");
    std::fs::write(&path, vec![0x5au8; 3 << 20]).unwrap();
    let mut vm = Vmm::probe(
        "probe.shared=1 probe.seed=3",
        &["--mem-mib", "64", "--initrd", path.to_str().unwrap()],
    );
    let lines = vm.lines_until("PROBE READY", BOOT);
    assert!(
        !lines.iter().any(|l| l.starts_with("PROBE IMAGE")),
        "{lines:#?}"
    );
    let v = vm.command("verify", "PROBE VERIFY");
    assert_eq!(field(&v, "result"), Some("ok"), "{v}");
    assert_eq!(field(&v, "image"), None, "{v}");
    vm.poweroff();
}

#[test]
fn zero_pages_are_capped_to_the_free_pool() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("image-cap");
    // A 64 MiB guest cannot hold the 1 GiB source's zero pages: it touches
    // every free pool page (all RAM but the probe and the initrd) instead.
    let pack = SyntheticPack {
        shared: 256,
        unique: 256,
        zero: 262_144 - 512,
        key: 5,
    };
    let mut vm = boot_with_pack(&dir, &pack, "probe.image=initrd probe.seed=9", 64);
    let image = vm.expect_line("PROBE IMAGE", BOOT);
    let zero = dec(&image, "zero");
    assert_eq!(dec(&image, "zero_wanted"), 262_144 - 512, "{image}");
    // 64 MiB - the first 2 MiB - the initrd (header, table, 512 pages).
    assert_eq!(zero, 64 * 256 - 512 - (1 + 1 + 512), "{image}");
    vm.expect_line("PROBE READY", BOOT);
    let v = vm.command("verify", "PROBE VERIFY");
    assert_eq!(field(&v, "image"), Some("ok"), "{v}");
    vm.poweroff();
}

/// Boots the probe with `probe.image=initrd` and the given initrd bytes (or
/// none) and returns its `PROBE ERROR` line; the VMM exits.
fn image_error(initrd: Option<&[u8]>) -> String {
    let dir = TempDir::new("image-bad");
    let path = dir.join("bad.ksmvmram");
    let mut extra = vec!["--mem-mib".to_string(), "64".into()];
    if let Some(bytes) = initrd {
        std::fs::write(&path, bytes).unwrap();
        extra.push("--initrd".into());
        extra.push(path.display().to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut vm = Vmm::probe("probe.image=initrd probe.seed=1", &extra);
    let err = vm.expect_line("PROBE ERROR", BOOT);
    let (status, stderr) = vm.wait_keeping(BOOT);
    assert!(status.code().is_some(), "{status:?}: {stderr}");
    assert!(
        !vm.seen.iter().any(|l| l.starts_with("PROBE READY")),
        "the probe must stop before READY: {:#?}",
        vm.seen
    );
    err
}

#[test]
fn bad_packs_are_refused_clearly() {
    if !have_kvm() {
        return;
    }
    let pack = SyntheticPack {
        shared: 4,
        unique: 4,
        zero: 8,
        key: 1,
    };
    let mut good = Vec::new();
    pack.write(|b| good.extend_from_slice(b));

    let mut magic = good.clone();
    magic[..8].copy_from_slice(b"NOTAPACK");
    let e = image_error(Some(&magic));
    assert!(e.starts_with("PROBE ERROR image: bad magic"), "{e}");

    let mut version = good.clone();
    version[8] = 7;
    let e = image_error(Some(&version));
    assert!(
        e.starts_with("PROBE ERROR image: unsupported version 7"),
        "{e}"
    );

    let e = image_error(Some(&good[..good.len() - 4096]));
    assert!(e.starts_with("PROBE ERROR image: size "), "{e}");

    let e = image_error(Some(&good[..100]));
    assert!(e.starts_with("PROBE ERROR image: 100 bytes"), "{e}");

    // A shared page whose table entry says it is unique.
    let mut class = good.clone();
    class[4096 + 7] = 5;
    let e = image_error(Some(&class));
    assert!(
        e.starts_with("PROBE ERROR image: page table entry 0 has class 5"),
        "{e}"
    );

    let e = image_error(None);
    assert!(e.starts_with("PROBE ERROR image: no initrd"), "{e}");
}

/// How long the KSM test waits for the host lock (a benchmark may hold it
/// for a long time): `KSMVM_TEST_LOCK_WAIT_S`, default 600 s.
fn lock_wait() -> Duration {
    let s = std::env::var("KSMVM_TEST_LOCK_WAIT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(s)
}

#[test]
fn guests_loading_the_same_pack_merge_its_shared_pages_only() {
    if !have_kvm() || !have_ksm() {
        return;
    }
    let wait = lock_wait();
    let Some(_lock) = HostLock::acquire_within(wait).expect("KSM host lock") else {
        require(
            false,
            &format!("the KSM host lock within {wait:?} (another test or benchmark holds it)"),
        );
        return;
    };
    let (_ksm, guard) = fast_ksm();

    // No zero pages: they would merge too and blur the count.
    let pack = SyntheticPack {
        shared: 32 * 256,
        unique: 16 * 256,
        zero: 0,
        key: 77,
    };
    let dir = TempDir::new("image-ksm");
    let path = dir.join("image.ksmvmram");
    write_pack(&path, &pack);
    let mut vms: Vec<Vmm> = (1..=2u64)
        .map(|seed| {
            Vmm::probe(
                &format!("probe.image=initrd probe.seed={seed}"),
                &[
                    "--mem-mib",
                    "128",
                    "--initrd",
                    path.to_str().unwrap(),
                    "--name",
                    &format!("image{seed}"),
                ],
            )
        })
        .collect();
    for vm in &mut vms {
        vm.expect_line("PROBE READY", BOOT);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let merged = loop {
        let m: Vec<u64> = vms
            .iter()
            .map(|v| proc_ksm_count(v.pid(), "ksm_merging_pages"))
            .collect();
        if m.iter().all(|&p| p >= pack.shared * 9 / 10) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "KSM did not merge 90% of the {} shared image pages: {m:?}",
            pack.shared
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Let KSM finish another pass, then check that the own (seeded) pages
    // stayed apart: merging is bounded by the shared pages plus the probe's
    // own identical pages (its image, page tables: well under 1024).
    std::thread::sleep(Duration::from_secs(2));
    for vm in &vms {
        let m = proc_ksm_count(vm.pid(), "ksm_merging_pages");
        assert!(
            m < pack.shared + 1024,
            "{m} pages merged: the image's own pages must not merge (shared {}, own {})",
            pack.shared,
            pack.unique
        );
    }
    eprintln!("merged pages per VM: {merged:?} of {} shared", pack.shared);
    for (i, vm) in vms.iter_mut().enumerate() {
        let v = vm.command("verify", "PROBE VERIFY");
        assert_eq!(field(&v, "image"), Some("ok"), "guest {}: {v}", i + 1);
        assert_eq!(field(&v, "result"), Some("ok"), "guest {}: {v}", i + 1);
    }
    for vm in vms {
        vm.poweroff();
    }
    guard.restore().expect("restore KSM settings");
}
