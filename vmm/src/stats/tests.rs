//! Derived figures, and samples of real anonymous mappings of this process.

use std::time::{Duration, Instant};

use super::*;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap()
}

fn guest(rss: u64, pss: u64, ksm: Option<u64>) -> GuestRamStats {
    GuestRamStats {
        rss,
        pss,
        anonymous: rss,
        ksm,
        vmas: 1,
        ..Default::default()
    }
}

#[test]
fn derive_unmerged_vm() {
    let ksm = parse_ksm_stat(include_str!("fixtures/ksm_stat_6_18.txt")).unwrap();
    let s = VmStats::derive(
        64 * MIB,
        guest(60 * MIB, 60 * MIB, Some(0)),
        ksm,
        70 * MIB,
        PAGE,
        true,
    );
    assert_eq!(s.vmm_overhead_bytes, 10 * MIB);
    assert_eq!(s.merged_fraction, Some(0.0));
    assert_eq!(s.ksm_metadata_bytes, Some(0));
    assert_eq!(s.effective_bytes, Some(60 * MIB));
    assert_eq!(s.ksm_saved_bytes, Some(0));
}

#[test]
fn derive_merged_vm() {
    // 12 MiB of 16 MiB resident guest RAM merged; each KSM page has 6 mappers.
    let ksm = parse_ksm_stat(include_str!("fixtures/ksm_stat_merged.txt")).unwrap();
    let rss = 16 * MIB;
    let pss = 4 * MIB + 2 * MIB;
    let s = VmStats::derive(
        64 * MIB,
        guest(rss, pss, Some(12 * MIB)),
        ksm,
        20 * MIB,
        PAGE,
        true,
    );
    assert_eq!(s.merged_fraction, Some(0.75));
    let metadata = 16384 * 64; // rmap items x sizeof(struct ksm_rmap_item)
    assert_eq!(s.ksm_metadata_bytes, Some(metadata));
    assert_eq!(s.effective_bytes, Some(pss + metadata));
    assert_eq!(
        s.ksm_saved_bytes,
        Some(i64_of(rss - pss) - i64_of(metadata))
    );
    // effective = (resident + zero-page merges) - saved.
    assert_eq!(
        i64_of(s.effective_bytes.unwrap()),
        i64_of(rss) - s.ksm_saved_bytes.unwrap()
    );
}

#[test]
fn derive_zero_pages_count_as_saved() {
    let ksm = KsmProcessStats {
        ksm_rmap_items: Some(1000),
        ksm_merging_pages: Some(0),
        ksm_zero_pages: Some(500),
        ksm_process_profit: Some(500 * 4096 - 1000 * 64),
        ..Default::default()
    };
    let s = VmStats::derive(
        8 * MIB,
        guest(4 * MIB, 4 * MIB, Some(0)),
        ksm,
        5 * MIB,
        PAGE,
        true,
    );
    assert_eq!(s.ksm_metadata_bytes, Some(64_000));
    assert_eq!(s.ksm_saved_bytes, Some(500 * 4096 - 64_000));
    assert_eq!(s.effective_bytes, Some(4 * MIB + 64_000));
}

#[test]
fn derive_unavailable_is_none() {
    // KSM in the kernel but no ksm_stat (before 6.1) and no KSM: line.
    let s = VmStats::derive(
        64 * MIB,
        guest(10 * MIB, 10 * MIB, None),
        KsmProcessStats::default(),
        8 * MIB,
        PAGE,
        true,
    );
    assert_eq!(s.merged_fraction, None);
    assert_eq!(s.ksm_metadata_bytes, None);
    assert_eq!(s.effective_bytes, None);
    assert_eq!(s.ksm_saved_bytes, None);
    // RSS read at slightly different times must not underflow.
    assert_eq!(s.vmm_overhead_bytes, 0);
    // Linux 6.1: ksm_stat without profit; the rmap items give the metadata.
    let old = KsmProcessStats {
        ksm_rmap_items: Some(3),
        ksm_merging_pages: Some(1),
        ..Default::default()
    };
    assert_eq!(old.metadata_bytes(PAGE), Some(3 * RMAP_ITEM_BYTES));
    let s = VmStats::derive(
        64 * MIB,
        guest(10 * MIB, 9 * MIB, Some(PAGE)),
        old,
        12 * MIB,
        PAGE,
        true,
    );
    assert_eq!(s.effective_bytes, Some(9 * MIB + 3 * RMAP_ITEM_BYTES));
    assert_eq!(s.ksm_saved_bytes, Some(i64_of(MIB - 3 * RMAP_ITEM_BYTES)));
    // No KSM in the kernel: nothing can be merged, so the figures are exact.
    let s = VmStats::derive(
        64 * MIB,
        guest(10 * MIB, 10 * MIB, None),
        KsmProcessStats::default(),
        12 * MIB,
        PAGE,
        false,
    );
    assert_eq!(s.effective_bytes, Some(10 * MIB));
    assert_eq!(s.ksm_saved_bytes, Some(0));
}

#[test]
fn vm_stats_json_names() {
    let s = VmStats::derive(
        64 * MIB,
        guest(MIB, MIB, Some(0)),
        KsmProcessStats::default(),
        2 * MIB,
        PAGE,
        false,
    );
    let v = serde_json::to_value(&s).unwrap();
    for key in [
        "guest_ram_bytes",
        "guest_ram",
        "ksm",
        "process_rss",
        "vmm_overhead_bytes",
        "merged_fraction",
        "effective_bytes",
        "ksm_saved_bytes",
        "ksm_metadata_bytes",
    ] {
        assert!(v.get(key).is_some(), "{key} missing in {v}");
    }
    assert!(v["ksm"]["ksm_process_profit"].is_null());
}

/// An anonymous private mapping, as a VMM maps guest RAM; unmapped on drop.
struct AnonMapping {
    addr: *mut u8,
    len: usize,
}

impl AnonMapping {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks;
        // it aliases nothing, and the result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap {len} bytes");
        let m = Self {
            addr: addr.cast(),
            len,
        };
        // As the VMM does for guest RAM: the flag keeps the kernel from
        // merging this VMA with a neighbouring anonymous mapping.
        m.madvise(libc::MADV_DONTDUMP);
        m
    }

    fn madvise(&self, advice: libc::c_int) {
        // SAFETY: the range is exactly this live mapping; advice does not
        // invalidate Rust references (none outlive the call).
        let rc = unsafe { libc::madvise(self.addr.cast(), self.len, advice) };
        assert_eq!(
            rc,
            0,
            "madvise {advice}: {}",
            std::io::Error::last_os_error()
        );
    }

    fn pages(&mut self) -> impl Iterator<Item = &mut [u8]> {
        // SAFETY: the mapping is readable and writable for `len` bytes, lives
        // as long as `self`, and `&mut self` makes this the only view of it.
        let all = unsafe { std::slice::from_raw_parts_mut(self.addr, self.len) };
        all.chunks_mut(usize::try_from(PAGE).unwrap())
    }

    /// Pages whose content differs from each other (KSM cannot merge them).
    fn fill_unique(&mut self) {
        for (i, page) in self.pages().enumerate() {
            page.fill(0xa5);
            page[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
    }

    /// Every page the same non-zero content (KSM merges them all).
    fn fill_same(&mut self) {
        for page in self.pages() {
            page.fill(0x5a);
        }
    }

    fn region(&self) -> (u64, u64) {
        (self.addr as u64, self.len as u64)
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no references
        // into it survive `self`.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

#[test]
fn real_64mib_mapping_is_measured() {
    let mut m = AnonMapping::new(64 << 20);
    m.madvise(libc::MADV_NOHUGEPAGE);
    m.fill_unique();
    m.madvise(libc::MADV_MERGEABLE);
    let mut sampler = Sampler::new([m.region()]).unwrap();
    let s = sampler.sample().unwrap();
    let g = &s.guest_ram;
    assert_eq!(s.guest_ram_bytes, 64 * MIB);
    assert_eq!(g.rss, 64 * MIB, "{s:?}");
    assert_eq!(g.anonymous, 64 * MIB);
    assert_eq!(g.swap, 0);
    assert!(g.vmas >= 1);
    // Unique content cannot be merged, so it is all private to us.
    assert_eq!(g.pss, 64 * MIB);
    assert_eq!(g.ksm.unwrap_or(0), 0);
    assert!(s.process_rss > g.rss);
    assert_eq!(s.vmm_overhead_bytes, s.process_rss - g.rss);
    if std::path::Path::new("/proc/self/ksm_stat").exists() {
        assert_eq!(s.ksm.ksm_mergeable, Some(true));
    }

    // Splitting the VMA (mprotect of the middle) does not change the sums.
    // SAFETY: a page-aligned sub-range of the live mapping; nothing reads
    // it while it is read-only.
    let rc = unsafe { libc::mprotect(m.addr.add(16 << 20).cast(), 1 << 20, libc::PROT_READ) };
    assert_eq!(rc, 0);
    let split = sampler.sample().unwrap();
    assert_eq!(split.guest_ram.vmas, g.vmas + 2);
    assert_eq!(split.guest_ram.rss, 64 * MIB);
}

#[test]
fn fresh_sample_tracks_residency_between_smaps_passes() {
    let mut m = AnonMapping::new(32 << 20);
    m.madvise(libc::MADV_NOHUGEPAGE);
    let mut sampler = Sampler::new([m.region()]).unwrap();
    let first = sampler.sample_fresh(Duration::from_secs(3600)).unwrap();
    assert_eq!(first.guest_ram.rss, 0);
    assert_eq!(
        first.detail_age_ms,
        Some(0),
        "the first sample is a full one"
    );
    m.fill_unique();
    // No new smaps pass (the detail is young), but Rss is current.
    let fresh = sampler.sample_fresh(Duration::from_secs(3600)).unwrap();
    assert_eq!(fresh.guest_ram.rss, 32 * MIB);
    assert_eq!(fresh.guest_ram.pss, 0, "Pss still from the first pass");
    assert!(fresh.detail_age_ms.is_some());
    assert_eq!(fresh.vmm_overhead_bytes, first.vmm_overhead_bytes);
    // A zero max age forces a full pass.
    let full = sampler.sample_fresh(Duration::ZERO).unwrap();
    assert_eq!(full.guest_ram.pss, 32 * MIB);
    assert_eq!(full.detail_age_ms, Some(0));
}

/// `cargo test --release -p ksmvm --lib sample_time_1gib -- --ignored --nocapture`
#[test]
#[ignore = "allocates 1 GiB; run by hand to measure"]
fn sample_time_1gib() {
    for (name, hugepage) in [("4 KiB pages", false), ("THP", true)] {
        let mut m = AnonMapping::new(1 << 30);
        m.madvise(if hugepage {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        });
        m.fill_unique();
        m.madvise(libc::MADV_MERGEABLE);
        let mut sampler = Sampler::new([m.region()]).unwrap();
        let s = sampler.sample().unwrap();
        assert_eq!(s.guest_ram.rss, 1 << 30);
        let mut times: Vec<Duration> = (0..50)
            .map(|_| {
                let t = Instant::now();
                let s = sampler.sample().unwrap();
                let d = t.elapsed();
                assert_eq!(s.guest_ram.rss, 1 << 30);
                d
            })
            .collect();
        times.sort();
        // The same walk without any parsing: what the kernel alone costs.
        let mut raw = Vec::with_capacity(1 << 20);
        let t = Instant::now();
        std::io::Read::read_to_end(
            &mut std::fs::File::open("/proc/self/smaps").unwrap(),
            &mut raw,
        )
        .unwrap();
        println!("  kernel only (read smaps, no parsing): {:?}", t.elapsed());
        let mut fresh: Vec<Duration> = (0..50)
            .map(|_| {
                let t = Instant::now();
                let s = sampler.sample_fresh(Duration::from_secs(3600)).unwrap();
                let d = t.elapsed();
                assert_eq!(s.guest_ram.rss, 1 << 30);
                d
            })
            .collect();
        fresh.sort();
        println!(
            "  sample_fresh() (mincore + ksm_stat): min {:?} median {:?} max {:?}",
            fresh[0],
            fresh[fresh.len() / 2],
            fresh[fresh.len() - 1]
        );
        println!(
            "sample() of 1 GiB guest RAM ({name}, AnonHugePages {} MiB): min {:?} median {:?} max {:?}",
            s.guest_ram.anon_huge_pages >> 20,
            times[0],
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
}

/// Merges 64 MiB of identical pages with the real ksmd and checks the
/// per-VM figures against the host counters.
#[test]
#[ignore = "changes host-global KSM settings; needs root"]
fn real_ksm_merge_is_reported() {
    use crate::ksm::{HostLock, Ksm, KsmError, KsmTuning};

    let ksm = Ksm::new();
    if !ksm.is_available() || !std::path::Path::new("/proc/self/ksm_stat").exists() {
        return;
    }
    let _lock = HostLock::acquire().unwrap();
    let _restore = ksm.settings_guard().unwrap();

    let mut m = AnonMapping::new(64 << 20);
    m.madvise(libc::MADV_NOHUGEPAGE);
    m.fill_same();
    m.madvise(libc::MADV_MERGEABLE);
    let mut sampler = Sampler::new([m.region()]).unwrap();

    ksm.tune(&KsmTuning {
        advisor_mode: Some(crate::ksm::AdvisorMode::None),
        ..Default::default()
    })
    .unwrap();
    ksm.tune(&KsmTuning {
        pages_to_scan: Some(20_000),
        sleep_millisecs: Some(10),
        enabled: Some(true),
        ..Default::default()
    })
    .unwrap();
    // Two full scans after start: the first only fills the unstable tree.
    let start_scans = ksm.counters().unwrap().full_scans.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ksm.counters().unwrap().full_scans.unwrap() < start_scans + 2 {
        assert!(Instant::now() < deadline, "ksmd did not finish two scans");
        std::thread::sleep(Duration::from_millis(50));
    }
    ksm.disable().unwrap();
    let host = ksm.counters().unwrap();
    let s = sampler.sample().unwrap();
    println!("{s:#?}\nhost: {host:#?}");

    let g = &s.guest_ram;
    assert_eq!(g.rss, 64 * MIB);
    assert!(s.merged_fraction.unwrap() > 0.99, "{s:?}");
    assert!(s.ksm.ksm_merging_pages.unwrap() * PAGE >= 63 * MIB);
    assert!(g.pss < MIB, "KSM pages are shared 256 ways: {}", g.pss);
    let metadata = s.ksm_metadata_bytes.unwrap();
    assert_eq!(
        metadata,
        s.ksm.ksm_rmap_items.unwrap() * 64,
        "sizeof(ksm_rmap_item) = 64"
    );
    assert_eq!(s.effective_bytes, Some(g.pss + metadata));

    // When every merged page on the host is ours, the host's general_profit
    // equals our saved bytes up to Pss rounding (< 1 KiB per VMA), and our
    // ksm_process_profit exceeds it by one page per KSM page (pages_shared).
    // Other processes may merge while ksmd runs, so check only then.
    let merged_on_host = host.pages_shared.unwrap() + host.pages_sharing.unwrap();
    if merged_on_host == s.ksm.ksm_merging_pages.unwrap() && host.ksm_zero_pages == Some(0) {
        let general = host.general_profit.unwrap();
        let saved = s.ksm_saved_bytes.unwrap();
        assert!(
            (general - saved).abs() <= 1024 * i64::from(g.vmas),
            "general {general} saved {saved}"
        );
        let profit = s.ksm.ksm_process_profit.unwrap();
        assert_eq!(profit - general, i64_of(host.pages_shared.unwrap() * PAGE));
    } else {
        println!("other processes hold merged pages: host/VM comparison skipped");
    }

    // The kernel refuses these while pages are merged: the error says why.
    let cur = ksm.settings().unwrap().max_page_sharing.unwrap();
    let err = ksm
        .tune(&KsmTuning {
            max_page_sharing: Some(cur + 1),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            KsmError::Busy {
                knob: "max_page_sharing",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("unmerge"), "{err}");
    drop(m);
}
