//! KSM merges identical guest memory across VMs, and copy-on-write keeps
//! every guest's own data intact after merging.

use std::time::{Duration, Instant};

use ksmvm::ksm::HostLock;
use ksmvm_testkit::*;

const BOOT: Duration = Duration::from_secs(60);

#[test]
fn twin_probes_merge_and_keep_their_own_data() {
    if !have_kvm() || !have_ksm() {
        return;
    }
    let _lock = HostLock::acquire().expect("KSM host lock");
    let (_ksm, guard) = fast_ksm();

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
        let m: Vec<u64> = vms
            .iter()
            .map(|v| proc_ksm_count(v.pid(), "ksm_merging_pages"))
            .collect();
        if m.iter().all(|&p| p >= shared_pages * 9 / 10) {
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
    for vm in vms {
        vm.poweroff();
    }
    guard.restore().expect("restore KSM settings");
}
