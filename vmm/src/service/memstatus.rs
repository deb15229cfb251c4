//! The memory half of the STATUS= line: how much of this VM's guest RAM is
//! resident and how much of it KSM has merged, from the VMM's own
//! /proc/self/smaps (only the guest RAM mappings count).
// TODO(stats): use stats::Sampler once the stats branch is in main.

use crate::memory::HostRegion;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemSample {
    /// Bytes of guest RAM resident in host memory.
    pub resident: u64,
    /// Bytes of guest RAM that are KSM-merged pages; None where the kernel
    /// has no `KSM:` line in smaps.
    pub merged: Option<u64>,
}

/// Samples /proc/self/smaps; None if it cannot be read.
pub fn sample(regions: &[HostRegion]) -> Option<MemSample> {
    match std::fs::read_to_string("/proc/self/smaps") {
        Ok(text) => Some(parse_smaps(&text, regions)),
        Err(e) => {
            log::debug!("cannot read /proc/self/smaps: {e}");
            None
        }
    }
}

/// `start-end` of a mapping header line (`7f..-7f.. rw-p ...`).
fn mapping_range(line: &str) -> Option<(u64, u64)> {
    let range = line.split_whitespace().next()?;
    let (start, end) = range.split_once('-')?;
    Some((
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    ))
}

/// `Rss:   123 kB` → bytes.
fn kb_field(line: &str, name: &str) -> Option<u64> {
    let rest = line.strip_prefix(name)?.strip_prefix(':')?;
    let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

pub fn parse_smaps(text: &str, regions: &[HostRegion]) -> MemSample {
    let mut out = MemSample::default();
    let mut in_guest = false;
    for line in text.lines() {
        if let Some((start, end)) = mapping_range(line) {
            // A region may be split into several mappings; each lies inside it.
            in_guest = regions
                .iter()
                .any(|r| start >= r.host_addr && end <= r.host_addr + r.len);
            continue;
        }
        if !in_guest {
            continue;
        }
        if let Some(b) = kb_field(line, "Rss") {
            out.resident += b;
        } else if let Some(b) = kb_field(line, "KSM") {
            *out.merged.get_or_insert(0) += b;
        }
    }
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// E.g. `guest RAM 256 MiB: resident 80.2 MiB, KSM-merged 41.0 MiB`.
pub fn status_text(guest_bytes: u64, ksm: bool, s: &MemSample) -> String {
    let merged = match (ksm, s.merged) {
        (false, _) => "KSM off".to_owned(),
        (true, Some(m)) => format!("KSM-merged {}", mib(m)),
        (true, None) => "KSM-merged unknown".to_owned(),
    };
    format!(
        "guest RAM {} MiB: resident {}, {merged}",
        guest_bytes >> 20,
        mib(s.resident)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/ksmvm
Rss:                 800 kB
KSM:                   0 kB
7f0000000000-7f0002000000 rw-p 00000000 00:00 0
Size:              32768 kB
Rss:                1024 kB
Pss:                 512 kB
KSM:                 256 kB
VmFlags: rd wr mr mw me ac mg
7f0002000000-7f0004000000 rw-p 00000000 00:00 0
Rss:                2048 kB
KSM:                   4 kB
7f0004000000-7f0004001000 rw-p 00000000 00:00 0
Rss:                   4 kB
";

    fn regions() -> Vec<HostRegion> {
        vec![HostRegion {
            guest_addr: 0,
            host_addr: 0x7f00_0000_0000,
            len: 64 << 20,
        }]
    }

    #[test]
    fn sums_only_guest_ram_mappings() {
        let s = parse_smaps(SMAPS, &regions());
        assert_eq!(s.resident, (1024 + 2048) * 1024);
        assert_eq!(s.merged, Some((256 + 4) * 1024));
        let no_ksm = SMAPS.replace("KSM:", "Swap:");
        assert_eq!(parse_smaps(&no_ksm, &regions()).merged, None);
    }

    #[test]
    fn formats_a_short_line() {
        let s = MemSample {
            resident: 3 << 20,
            merged: Some(1 << 19),
        };
        assert_eq!(
            status_text(64 << 20, true, &s),
            "guest RAM 64 MiB: resident 3.0 MiB, KSM-merged 0.5 MiB"
        );
        assert_eq!(
            status_text(64 << 20, false, &s),
            "guest RAM 64 MiB: resident 3.0 MiB, KSM off"
        );
    }

    #[test]
    fn samples_this_process() {
        let mem = crate::memory::create(8 << 20).unwrap();
        let regions = crate::memory::host_regions(&mem);
        use vm_memory::Bytes;
        mem.write_slice(&[1u8; 4096], vm_memory::GuestAddress(0))
            .unwrap();
        let s = sample(&regions).unwrap();
        assert!(s.resident >= 4096, "{s:?}");
    }
}
