//! The memory half of the STATUS= line: how much of this VM's guest RAM is
//! resident and how much of it KSM has merged, from the stats module's
//! sampler (mincore and ksm_stat: cheap enough for every few seconds).

use std::time::Duration;

use vm_memory::GuestMemoryMmap;

use crate::stats::Sampler;

/// Pss and the other smaps-only figures are not on the line; a full smaps
/// pass (which walks every page table entry) is needed only this rarely.
const DETAIL_AGE: Duration = Duration::from_secs(300);

pub struct MemStatus {
    sampler: Option<Sampler>,
    guest_bytes: u64,
    ksm: bool,
}

impl MemStatus {
    pub fn new(mem: &GuestMemoryMmap, ksm: bool) -> Self {
        let regions: Vec<(u64, u64)> = crate::memory::host_regions(mem)
            .into_iter()
            .map(|r| (r.host_addr, r.len))
            .collect();
        let guest_bytes = regions.iter().map(|r| r.1).sum();
        let sampler = match Sampler::new(regions) {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("memory status unavailable: {e}");
                None
            }
        };
        Self {
            sampler,
            guest_bytes,
            ksm,
        }
    }

    /// E.g. `guest RAM 256 MiB: resident 80.2 MiB, KSM-merged 41.0 MiB`.
    pub fn line(&mut self) -> String {
        let sample = self.sampler.as_mut().map(|s| s.sample_fresh(DETAIL_AGE));
        match sample {
            Some(Ok(st)) => status_text(
                self.guest_bytes,
                self.ksm,
                st.guest_ram.rss,
                st.guest_ram.ksm,
            ),
            Some(Err(e)) => {
                log::debug!("memory status: {e}");
                "memory unknown".into()
            }
            None => "memory unknown".into(),
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

pub fn status_text(guest_bytes: u64, ksm: bool, resident: u64, merged: Option<u64>) -> String {
    let merged = match (ksm, merged) {
        (false, _) => "KSM off".to_owned(),
        (true, Some(m)) => format!("KSM-merged {}", mib(m)),
        (true, None) => "KSM-merged unknown".to_owned(),
    };
    format!(
        "guest RAM {} MiB: resident {}, {merged}",
        guest_bytes >> 20,
        mib(resident)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_a_short_line() {
        assert_eq!(
            status_text(64 << 20, true, 3 << 20, Some(1 << 19)),
            "guest RAM 64 MiB: resident 3.0 MiB, KSM-merged 0.5 MiB"
        );
        assert_eq!(
            status_text(64 << 20, false, 3 << 20, Some(0)),
            "guest RAM 64 MiB: resident 3.0 MiB, KSM off"
        );
        assert_eq!(
            status_text(64 << 20, true, 0, None),
            "guest RAM 64 MiB: resident 0.0 MiB, KSM-merged unknown"
        );
    }

    #[test]
    fn samples_this_process() {
        use vm_memory::Bytes;
        let mem = crate::memory::create(8 << 20).unwrap();
        mem.write_slice(&vec![1u8; 1 << 20], vm_memory::GuestAddress(0))
            .unwrap();
        let line = MemStatus::new(&mem, true).line();
        assert!(line.starts_with("guest RAM 8 MiB: resident "), "{line}");
        assert!(!line.contains("resident 0.0 MiB"), "{line}");
    }
}
