//! KSM merges identical guest memory across VMs, and copy-on-write keeps
//! every guest's own data intact after merging.

mod support;

use std::time::{Duration, Instant};

use ksmvm::ksm::{HostLock, Ksm, KsmTuning};
use support::*;

const BOOT: Duration = Duration::from_secs(60);

/// A field of /proc/PID/ksm_stat, read from outside the VMM.
fn ksm_stat(pid: u32, key: &str) -> i64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ksm_stat: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/ksm_stat: {text}"))
}

/// Raises the scan rate for the test's duration (restored by the guard).
fn fast_ksm(ksm: &Ksm) {
    ksm.tune(&KsmTuning {
        pages_to_scan: Some(20_000),
        sleep_millisecs: Some(20),
        enabled: Some(true),
        ..Default::default()
    })
    .expect("tune KSM");
}

#[test]
fn twin_probes_merge_and_keep_their_own_data() {
    if !have_kvm() || !have_ksm() {
        return;
    }
    let _lock = HostLock::acquire().expect("KSM host lock");
    let ksm = Ksm::new();
    let guard = ksm.settings_guard().expect("save KSM settings");
    fast_ksm(&ksm);

    const SHARED_MIB: u64 = 48;
    let shared_pages = SHARED_MIB * 256;
    let mut vms: Vec<Vmm> = (1..=2)
        .map(|seed| {
            Vmm::probe(
                &format!(
                    "probe.shared={SHARED_MIB} probe.unique=8 probe.profile=5 probe.seed={seed}"
                ),
                &["--mem-mib", "128", "--name", &format!("twin{seed}")],
            )
        })
        .collect();
    for vm in &mut vms {
        vm.expect_line("PROBE READY", BOOT);
    }

    let deadline = Instant::now() + Duration::from_secs(90);
    let merged = loop {
        let m: Vec<i64> = vms
            .iter()
            .map(|v| ksm_stat(v.pid(), "ksm_merging_pages"))
            .collect();
        if m.iter().all(|&p| p as u64 >= shared_pages * 9 / 10) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "KSM did not merge 90% of {shared_pages} shared pages: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("merged pages per VM: {merged:?} of {shared_pages} shared");

    // After merging, each guest still reads back exactly its own content.
    for (i, vm) in vms.iter_mut().enumerate() {
        vm.send("verify");
        let v = vm.expect_line("PROBE VERIFY", BOOT);
        assert_eq!(field(&v, "result"), Some("ok"), "{v}");
        let seed = i as u64 + 1;
        assert_eq!(
            hex_field(&v, "unique"),
            probe_pattern::expected_checksum(probe_pattern::DOMAIN_UNIQUE, seed, 8 * 256)
        );
        assert_eq!(
            hex_field(&v, "shared"),
            probe_pattern::expected_checksum(probe_pattern::DOMAIN_SHARED, 5, shared_pages)
        );
    }
    for mut vm in vms {
        vm.send("poweroff");
        let (status, stderr) = vm.wait(BOOT);
        assert!(status.success(), "{stderr}");
    }
    guard.restore().expect("restore KSM settings");
}
