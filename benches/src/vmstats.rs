//! Per-VM statistics of a running guest, read from outside its VMM.
//!
//! The one place that knows how. A ksmvm with the control API is asked
//! over its socket (`GET /stats`, the same `VmStats` as `ksmvm stats NAME
//! --json`, docs/stats.md); otherwise, and for other VMMs, the harness runs
//! `ksmvm::stats::Sampler` itself on `/proc/PID/smaps` and
//! `/proc/PID/ksm_stat`, finding guest RAM in `/proc/PID/maps`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use ksmvm::api::ApiClient;
use ksmvm::arch::x86_64::ram_ranges;
use ksmvm::stats::{GuestRegions, Sampler, VmStats};

/// Samples one VMM repeatedly (keeps its proc files open).
#[derive(Debug)]
pub enum VmStatsSource {
    Api(ApiClient),
    Proc(Box<Sampler>),
}

impl VmStatsSource {
    /// For a ksmvm process with `mem_mib` of guest RAM: through its API
    /// socket when it has one, else from /proc.
    pub fn for_ksmvm(pid: u32, mem_mib: u64, api_socket: Option<&Path>) -> Result<Self> {
        if let Some(sock) = api_socket.filter(|s| s.exists()) {
            return Ok(Self::Api(ApiClient::new(sock)));
        }
        Self::from_proc(pid, mem_mib)
    }

    /// For a ksmvm process, from /proc.
    pub fn from_proc(pid: u32, mem_mib: u64) -> Result<Self> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let maps = fs::read_to_string(proc.join("maps"))
            .with_context(|| format!("reading /proc/{pid}/maps"))?;
        let lens: Vec<u64> = ram_ranges(mem_mib << 20).iter().map(|r| r.1).collect();
        let regions = find_guest_ram(&maps, &lens)
            .with_context(|| format!("finding guest RAM in /proc/{pid}/maps"))?;
        Self::with_regions(&proc, regions)
    }

    /// For any VMM: guest RAM is every anonymous or shared-memory mapping of
    /// at least `min_len` bytes (a heuristic for VMMs we know nothing about).
    pub fn for_other_vmm(pid: u32, min_len: u64) -> Result<Self> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let maps = fs::read_to_string(proc.join("maps"))
            .with_context(|| format!("reading /proc/{pid}/maps"))?;
        let regions: Vec<(u64, u64)> = parse_maps(&maps)
            .into_iter()
            .filter(|m| m.size() >= min_len && m.is_ram_like())
            .map(|m| (m.start, m.size()))
            .collect();
        if regions.is_empty() {
            bail!(
                "no anonymous mapping of at least {} MiB in /proc/{pid}/maps",
                min_len >> 20
            );
        }
        Self::with_regions(&proc, regions)
    }

    fn with_regions(proc: &Path, regions: Vec<(u64, u64)>) -> Result<Self> {
        let regions = GuestRegions::new(regions)?;
        let sampler = Sampler::with_paths(
            regions,
            &proc.join("smaps"),
            &proc.join("ksm_stat"),
            Path::new(ksmvm::ksm::Ksm::SYSFS_ROOT).is_dir(),
        )?;
        Ok(Self::Proc(Box::new(sampler)))
    }

    pub fn sample(&mut self) -> Result<VmStats> {
        match self {
            Self::Api(c) => c
                .stats()
                .with_context(|| format!("GET /stats on {}", c.path().display())),
            Self::Proc(s) => Ok(s.sample()?),
        }
    }
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub path: String,
}

impl Mapping {
    pub fn size(&self) -> u64 {
        self.end - self.start
    }

    /// Anonymous (no path) or a memfd / shared-memory object.
    fn is_ram_like(&self) -> bool {
        self.perms.starts_with("rw")
            && (self.path.is_empty()
                || self.path.starts_with("/memfd:")
                || self.path.starts_with("/dev/shm/")
                || self.path.starts_with("/SYSV"))
    }
}

pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let (s, e) = f.next()?.split_once('-')?;
            let perms = f.next()?.to_string();
            let path = f.nth(3).unwrap_or("").to_string();
            Some(Mapping {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms,
                path,
            })
        })
        .collect()
}

/// The anonymous read-write mappings whose lengths are exactly the guest
/// RAM region lengths `lens` (ksmvm maps each region separately).
pub fn find_guest_ram(maps: &str, lens: &[u64]) -> Result<Vec<(u64, u64)>> {
    let maps = parse_maps(maps);
    let mut found = Vec::new();
    let mut used = vec![false; maps.len()];
    for &len in lens {
        let hit = maps.iter().enumerate().find(|(i, m)| {
            !used[*i] && m.size() == len && m.perms.starts_with("rw") && m.path.is_empty()
        });
        match hit {
            Some((i, m)) => {
                used[i] = true;
                found.push((m.start, len));
            }
            None => bail!("no anonymous read-write mapping of exactly {len:#x} bytes"),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 08:01 1234   /usr/bin/ksmvm
7f0000000000-7f0010000000 rw-p 00000000 00:00 0 
7f0010000000-7f0010200000 rw-p 00000000 00:00 0 
7f0020000000-7f0020001000 rw-s 00000000 00:0f 77     anon_inode:kvm-vcpu:0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0      [stack]
";

    #[test]
    fn finds_guest_ram_by_length() {
        let r = find_guest_ram(MAPS, &[256 << 20]).unwrap();
        assert_eq!(r, vec![(0x7f00_0000_0000, 256 << 20)]);
        assert!(find_guest_ram(MAPS, &[128 << 20]).is_err());
        // The same mapping cannot serve two regions.
        assert!(find_guest_ram(MAPS, &[256 << 20, 256 << 20]).is_err());
    }

    #[test]
    fn parses_maps_lines() {
        let m = parse_maps(MAPS);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].path, "/usr/bin/ksmvm");
        assert_eq!(m[1].path, "");
        assert_eq!(m[3].path, "anon_inode:kvm-vcpu:0");
        assert_eq!(m[4].path, "[stack]");
        assert!(m[1].is_ram_like() && !m[3].is_ram_like() && !m[4].is_ram_like());
    }

    #[test]
    fn samples_own_process() {
        // A 16 MiB mapping of our own, touched: the sampler sees it as guest RAM.
        let len = 16usize << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the mapping is ours and `len` bytes long.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 1, len) };
        let mut src =
            VmStatsSource::with_regions(Path::new("/proc/self"), vec![(p as u64, len as u64)])
                .unwrap();
        let s = src.sample().unwrap();
        assert_eq!(s.guest_ram_bytes, len as u64);
        assert_eq!(s.guest_ram.rss, len as u64);
        assert!(s.process_rss > s.guest_ram.rss);
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(p, len) };
    }
}
