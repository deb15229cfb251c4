//! Samples [`VmStats`] for the guest RAM of this process.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::ksm_stat::parse_ksm_stat;
use super::regions::GuestRegions;
use super::smaps::{SmapsAccumulator, SmapsTotals};
use super::{KsmProcessStats, StatsError, VmStats};

const SMAPS: &str = "/proc/self/smaps";
const KSM_STAT: &str = "/proc/self/ksm_stat";
const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";
/// Fits the smaps of a VMM with a few hundred VMAs in a handful of reads.
const READ_CHUNK: usize = 64 * 1024;

/// Holds the guest RAM regions and open proc files; `sample` rewinds and
/// re-reads them (a seq_file regenerates its content from offset 0).
#[derive(Debug)]
pub struct Sampler {
    regions: GuestRegions,
    smaps: File,
    smaps_path: PathBuf,
    /// None: this kernel has no ksm_stat (older than 6.1, or no CONFIG_KSM).
    ksm_stat: Option<(File, PathBuf)>,
    /// `ksm_merging_pages` beside ksm_stat (Linux >= 5.19): where ksm_stat
    /// lacks the count (Linux 6.1 has only ksm_rmap_items).
    merging_pages: Option<(File, PathBuf)>,
    ksm_built_in: bool,
    page_size: u64,
    buf: Vec<u8>,
    text: String,
    /// The last smaps pass and when it was taken (see `sample_fresh`).
    detail: Option<(Instant, SmapsTotals)>,
    /// mincore(2) output, one byte per guest page, reused between samples.
    residency: Vec<u8>,
}

impl Sampler {
    /// `regions`: (host start address, length) of each guest RAM region.
    pub fn new(regions: impl IntoIterator<Item = (u64, u64)>) -> Result<Self, StatsError> {
        Self::with_paths(
            GuestRegions::new(regions)?,
            Path::new(SMAPS),
            Path::new(KSM_STAT),
            Path::new(KSM_SYSFS).is_dir(),
        )
    }

    /// With other proc files (tests use fixtures).
    pub fn with_paths(
        regions: GuestRegions,
        smaps: &Path,
        ksm_stat: &Path,
        ksm_built_in: bool,
    ) -> Result<Self, StatsError> {
        let open_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StatsError::Open { path, source }
        };
        let smaps_file = File::open(smaps).map_err(open_err(smaps))?;
        let open_optional = |path: &Path| match File::open(path) {
            Ok(f) => Ok(Some((f, path.to_path_buf()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(open_err(path)(e)),
        };
        let merging_pages = open_optional(&ksm_stat.with_file_name("ksm_merging_pages"))?;
        let ksm_stat = open_optional(ksm_stat)?;
        Ok(Self {
            regions,
            smaps: smaps_file,
            smaps_path: smaps.to_path_buf(),
            ksm_stat,
            merging_pages,
            ksm_built_in,
            page_size: page_size(),
            buf: vec![0; READ_CHUNK],
            text: String::new(),
            detail: None,
            residency: Vec::new(),
        })
    }

    pub fn regions(&self) -> &GuestRegions {
        &self.regions
    }

    /// A full sample: every figure from one smaps pass plus ksm_stat.
    ///
    /// The kernel walks every page table entry of guest RAM to produce smaps
    /// (about 20 ms per GiB of 4 KiB pages on the development machine), so
    /// callers on a hot path use [`Sampler::sample_fresh`].
    pub fn sample(&mut self) -> Result<VmStats, StatsError> {
        let smaps = self.read_smaps()?;
        let ksm = self.read_ksm_stat()?;
        self.detail = Some((Instant::now(), smaps.clone()));
        let mut guest_ram = smaps.guest_ram;
        if guest_ram.ksm.is_none() {
            // No KSM: line in smaps (before Linux 6.7): the process-wide count.
            guest_ram.ksm = merged_bytes(None, &ksm, self.page_size, guest_ram.rss);
        }
        let mut stats = VmStats::derive(
            self.regions.total_len(),
            guest_ram,
            ksm,
            smaps.process_rss,
            self.page_size,
            self.ksm_built_in,
        );
        stats.detail_age_ms = Some(0);
        Ok(stats)
    }

    /// A cheap sample for the API: guest RAM residency from mincore(2) and the
    /// KSM counters from ksm_stat are read every time (well under 1 ms per
    /// GiB); Pss, swap, huge pages and the VMM overhead come from the last
    /// smaps pass, which is redone only when older than `max_detail_age`.
    pub fn sample_fresh(&mut self, max_detail_age: Duration) -> Result<VmStats, StatsError> {
        let stale = self
            .detail
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() > max_detail_age);
        if stale {
            return self.sample();
        }
        let Some((at, detail)) = self.detail.clone() else {
            return self.sample();
        };
        let ksm = self.read_ksm_stat()?;
        let rss = self.resident_bytes()?;
        let overhead = detail.process_rss.saturating_sub(detail.guest_ram.rss);
        let mut guest_ram = detail.guest_ram;
        guest_ram.rss = rss;
        guest_ram.pss = guest_ram.pss.min(rss);
        guest_ram.ksm = merged_bytes(guest_ram.ksm, &ksm, self.page_size, rss);
        let mut stats = VmStats::derive(
            self.regions.total_len(),
            guest_ram,
            ksm,
            rss + overhead,
            self.page_size,
            self.ksm_built_in,
        );
        stats.detail_age_ms = Some(u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX));
        Ok(stats)
    }

    fn read_smaps(&mut self) -> Result<SmapsTotals, StatsError> {
        let mut acc = SmapsAccumulator::new(&self.regions);
        for_each_line(&mut self.smaps, &mut self.buf, |line| acc.feed(line)).map_err(
            |e| match e {
                LineError::Io(source) => StatsError::Read {
                    path: self.smaps_path.clone(),
                    source,
                },
                LineError::Parse(e) => e,
            },
        )?;
        Ok(acc.finish())
    }

    /// Resident bytes of guest RAM, from mincore(2) over each region.
    fn resident_bytes(&mut self) -> Result<u64, StatsError> {
        let mut pages = 0u64;
        for &(start, end) in self.regions.ranges() {
            let len = end - start;
            let too_large = || StatsError::Region {
                start,
                len,
                problem: "larger than the address space",
            };
            // A mapping of this process: it fits the address space.
            let n = usize::try_from(len.div_ceil(self.page_size)).map_err(|_| too_large())?;
            let len_bytes = usize::try_from(len).map_err(|_| too_large())?;
            self.residency.resize(n, 0);
            // SAFETY: (start, len) is one of this process's guest RAM mappings,
            // which stay mapped while the VM exists; mincore only reads page
            // tables and writes `n` bytes into our buffer of exactly `n` bytes.
            let ret = unsafe {
                libc::mincore(
                    start as *mut libc::c_void,
                    len_bytes,
                    self.residency.as_mut_ptr(),
                )
            };
            if ret != 0 {
                return Err(StatsError::Read {
                    path: PathBuf::from("mincore(2) on guest RAM"),
                    source: io::Error::last_os_error(),
                });
            }
            pages += self.residency.iter().filter(|b| *b & 1 != 0).count() as u64;
        }
        Ok(pages * self.page_size)
    }

    fn read_ksm_stat(&mut self) -> Result<KsmProcessStats, StatsError> {
        let Some((file, path)) = &mut self.ksm_stat else {
            return Ok(KsmProcessStats::default());
        };
        let read_err = |source| StatsError::Read {
            path: path.clone(),
            source,
        };
        self.text.clear();
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
        file.read_to_string(&mut self.text).map_err(read_err)?;
        let mut ksm = parse_ksm_stat(&self.text)?;
        if ksm.ksm_merging_pages.is_none() {
            if let Some((file, path)) = &mut self.merging_pages {
                self.text.clear();
                let read_err = |source| StatsError::Read {
                    path: path.clone(),
                    source,
                };
                file.seek(SeekFrom::Start(0)).map_err(read_err)?;
                file.read_to_string(&mut self.text).map_err(read_err)?;
                let n = self.text.trim().parse().map_err(|_| StatsError::Parse {
                    file: "ksm_merging_pages",
                    line: self.text.trim().to_owned(),
                })?;
                ksm.ksm_merging_pages = Some(n);
            }
        }
        Ok(ksm)
    }
}

/// Merged guest RAM in bytes. The VMM marks only guest RAM mergeable, so
/// the process-wide merged page count is this VM's; it replaces the (older)
/// smaps KSM: figure, or stands in where smaps has none (Linux 6.1).
/// MADV_UNMERGEABLE copies every merged page back at once, while
/// ksm_merging_pages only drops when ksmd next passes: a process with no
/// mergeable memory left has nothing merged.
fn merged_bytes(smaps_ksm: Option<u64>, ksm: &KsmProcessStats, page: u64, rss: u64) -> Option<u64> {
    match (ksm.ksm_mergeable, ksm.ksm_merging_pages) {
        (Some(false), _) => Some(0),
        (_, Some(pages)) => Some(pages.saturating_mul(page).min(rss)),
        (_, None) => smaps_ksm,
    }
}

/// The host's page size (4096 if it cannot be asked).
pub fn page_size() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) if p > 0 => p.unsigned_abs(),
        _ => 4096,
    }
}

enum LineError {
    Io(io::Error),
    Parse(StatsError),
}

/// Reads `file` from the start and calls `f` with each line (no newline),
/// reusing `buf`; grows `buf` only for a line longer than it.
fn for_each_line(
    file: &mut File,
    buf: &mut Vec<u8>,
    mut f: impl FnMut(&[u8]) -> Result<(), StatsError>,
) -> Result<(), LineError> {
    file.seek(SeekFrom::Start(0)).map_err(LineError::Io)?;
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = match file.read(&mut buf[filled..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LineError::Io(e)),
        };
        if n == 0 {
            if filled > 0 {
                f(&buf[..filled]).map_err(LineError::Parse)?;
            }
            return Ok(());
        }
        let end = filled + n;
        let mut start = 0;
        while let Some(i) = buf[filled..end].iter().position(|&b| b == b'\n') {
            let nl = filled + i;
            f(&buf[start..nl]).map_err(LineError::Parse)?;
            start = nl + 1;
            filled = start;
        }
        buf.copy_within(start..end, 0);
        filled = end - start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn line_reader_handles_chunk_boundaries() {
        let dir = crate::ksm::test_util::TempDir::new("lines");
        let path = dir.path().join("f");
        let text: String = (0..1000)
            .map(|i| format!("line {i} {}\n", "x".repeat(i % 37)))
            .collect();
        File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        for cap in [1, 7, 64, 4096] {
            let mut f = File::open(&path).unwrap();
            let mut buf = vec![0; cap];
            let mut got = Vec::new();
            for _ in 0..2 {
                got.clear();
                let _ = for_each_line(&mut f, &mut buf, |l| {
                    got.push(String::from_utf8(l.to_vec()).unwrap());
                    Ok(())
                });
                assert_eq!(got, text.lines().collect::<Vec<_>>(), "cap {cap}");
            }
        }
    }

    #[test]
    fn linux_6_1_counts_come_from_ksm_merging_pages() {
        // 6.1: no KSM: line in smaps, ksm_stat has only ksm_rmap_items, and
        // /proc/PID/ksm_merging_pages holds the merged page count.
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/stats/fixtures");
        let dir = std::env::temp_dir().join(format!("ksmvm-6-1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let smaps: String = std::fs::read_to_string(d.join("smaps_vm.txt"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("KSM:"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(dir.join("smaps"), smaps).unwrap();
        std::fs::write(dir.join("ksm_stat"), "ksm_rmap_items 16384\n").unwrap();
        std::fs::write(dir.join("ksm_merging_pages"), "3072\n").unwrap();
        let regions = GuestRegions::new([(0x7f3a_4000_0000, 64 << 20)]).unwrap();
        let mut s =
            Sampler::with_paths(regions, &dir.join("smaps"), &dir.join("ksm_stat"), true).unwrap();
        let a = s.sample().unwrap();
        assert_eq!(a.ksm.ksm_merging_pages, Some(3072));
        assert_eq!(a.guest_ram.ksm, Some(3072 * 4096));
        assert_eq!(
            a.ksm_metadata_bytes,
            Some(16384 * super::super::RMAP_ITEM_BYTES)
        );
        assert!(a.merged_fraction.is_some_and(|f| f > 0.0));
        assert!(a.effective_bytes.is_some() && a.ksm_saved_bytes.is_some());
        std::fs::write(dir.join("ksm_merging_pages"), "junk\n").unwrap();
        let err = s.sample().unwrap_err().to_string();
        assert!(err.contains("ksm_merging_pages"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fixtures_through_sampler() {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/stats/fixtures");
        let regions = GuestRegions::new([(0x7f3a_4000_0000, 64 << 20)]).unwrap();
        let mut s = Sampler::with_paths(
            regions,
            &d.join("smaps_vm.txt"),
            &d.join("ksm_stat_merged.txt"),
            true,
        )
        .unwrap();
        let a = s.sample().unwrap();
        let b = s.sample().unwrap();
        assert_eq!(a, b, "re-reading from offset 0 gives the same result");
        assert_eq!(a.guest_ram_bytes, 64 << 20);
        assert_eq!(a.guest_ram.rss, 57344 << 10);
        assert_eq!(a.ksm.ksm_merging_pages, Some(3072));
        assert_eq!(a.ksm_metadata_bytes, Some(16384 * 64));

        let regions = GuestRegions::new([(0x7f3a_4000_0000, 64 << 20)]).unwrap();
        let mut s = Sampler::with_paths(regions, &d.join("smaps_vm.txt"), &d.join("absent"), false)
            .unwrap();
        let c = s.sample().unwrap();
        assert_eq!(c.ksm, KsmProcessStats::default());
        assert_eq!(c.ksm_metadata_bytes, Some(0));
    }
}
