//! `/proc/self/smaps` restricted to guest RAM.
//!
//! Lines are handled as bytes (mapping names need not be UTF-8). Only the
//! VMAs inside guest RAM are parsed field by field; for every other VMA the
//! parser only looks at the `Rss:` line, to sum the process RSS from the
//! same pass (see [`SmapsTotals::process_rss`]).

use super::regions::GuestRegions;
use super::{GuestRamStats, StatsError};

/// What one pass over smaps yields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmapsTotals {
    pub guest_ram: GuestRamStats,
    /// Sum of `Rss:` over every VMA of the process, bytes. Exact and taken
    /// in the same pass as the guest figures, unlike statm, whose per-CPU
    /// counters may lag, so the VMM overhead derived from both is consistent.
    pub process_rss: u64,
}

/// Consumes smaps one line at a time.
#[derive(Debug)]
pub struct SmapsAccumulator<'a> {
    regions: &'a GuestRegions,
    in_guest: bool,
    totals: SmapsTotals,
}

impl<'a> SmapsAccumulator<'a> {
    pub fn new(regions: &'a GuestRegions) -> Self {
        Self {
            regions,
            in_guest: false,
            totals: SmapsTotals::default(),
        }
    }

    /// One line, without its newline.
    pub fn feed(&mut self, line: &[u8]) -> Result<(), StatsError> {
        let Some(&first) = line.first() else {
            return Ok(());
        };
        // Field names start with an upper-case letter, VMA headers with a
        // lower-case hex address.
        if first.is_ascii_digit() || (b'a'..=b'f').contains(&first) {
            let (start, end) = parse_header(line).ok_or_else(|| parse_error(line))?;
            self.in_guest = self.regions.contains(start, end);
            if self.in_guest {
                self.totals.guest_ram.vmas += 1;
            }
            return Ok(());
        }
        if !self.in_guest {
            if let Some(rest) = line.strip_prefix(b"Rss:") {
                self.totals.process_rss += parse_kb(rest).ok_or_else(|| parse_error(line))?;
            }
            return Ok(());
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(parse_error(line));
        };
        let (name, rest) = (&line[..colon], &line[colon + 1..]);
        let g = &mut self.totals.guest_ram;
        let field = match name {
            b"Rss" => &mut g.rss,
            b"Pss" => &mut g.pss,
            b"Anonymous" => &mut g.anonymous,
            b"AnonHugePages" => &mut g.anon_huge_pages,
            b"Swap" => &mut g.swap,
            b"KSM" => g.ksm.get_or_insert(0),
            _ => return Ok(()),
        };
        let bytes = parse_kb(rest).ok_or_else(|| parse_error(line))?;
        *field += bytes;
        if name == b"Rss" {
            self.totals.process_rss += bytes;
        }
        Ok(())
    }

    pub fn finish(self) -> SmapsTotals {
        self.totals
    }
}

/// Parses a whole smaps text (tests, fixtures).
pub fn parse_smaps(text: &[u8], regions: &GuestRegions) -> Result<SmapsTotals, StatsError> {
    let mut acc = SmapsAccumulator::new(regions);
    for line in text.split(|&b| b == b'\n') {
        acc.feed(line)?;
    }
    Ok(acc.finish())
}

fn parse_error(line: &[u8]) -> StatsError {
    StatsError::Parse {
        file: "smaps",
        line: String::from_utf8_lossy(line).into_owned(),
    }
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let d = (b as char).to_digit(16)?;
        Some(acc << 4 | u64::from(d))
    })
}

/// `start-end perms ...` → (start, end).
fn parse_header(line: &[u8]) -> Option<(u64, u64)> {
    let dash = line.iter().position(|&b| b == b'-')?;
    let rest = &line[dash + 1..];
    let space = rest.iter().position(|&b| b == b' ')?;
    let start = parse_hex(&line[..dash])?;
    let end = parse_hex(&rest[..space])?;
    (start <= end).then_some((start, end))
}

/// `   1234 kB` → bytes.
fn parse_kb(rest: &[u8]) -> Option<u64> {
    let rest = rest.trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || rest[digits..].trim_ascii() != b"kB" {
        return None;
    }
    let kb = rest[..digits].iter().try_fold(0u64, |acc, &b| {
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("fixtures/smaps_vm.txt");
    const GUEST: u64 = 0x7f3a_4000_0000;
    const MIB: u64 = 1 << 20;

    fn guest() -> GuestRegions {
        GuestRegions::new([(GUEST, 64 * MIB)]).unwrap()
    }

    #[test]
    fn sums_only_guest_vmas() {
        let t = parse_smaps(FIXTURE.as_bytes(), &guest()).unwrap();
        let g = t.guest_ram;
        assert_eq!(g.vmas, 3);
        assert_eq!(g.rss, (16384 + 32768 + 8192) * 1024);
        assert_eq!(g.pss, (6144 + 32768 + 8192) * 1024);
        assert_eq!(g.anonymous, g.rss);
        assert_eq!(g.ksm, Some(12288 * 1024));
        assert_eq!(g.anon_huge_pages, 30720 * 1024);
        assert_eq!(g.swap, 1024 * 1024);
        // Every VMA's Rss (heap, libc, neighbour, guest, stack, vsyscall).
        let all_rss: u64 = FIXTURE
            .lines()
            .filter_map(|l| l.strip_prefix("Rss:"))
            .map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap() * 1024)
            .sum();
        assert_eq!(t.process_rss, all_rss);
        assert!(t.process_rss > g.rss);
    }

    #[test]
    fn region_split_in_two_still_sums_all() {
        let r = GuestRegions::new([(GUEST + 32 * MIB, 32 * MIB), (GUEST, 32 * MIB)]).unwrap();
        assert_eq!(
            parse_smaps(FIXTURE.as_bytes(), &r).unwrap(),
            parse_smaps(FIXTURE.as_bytes(), &guest()).unwrap()
        );
    }

    #[test]
    fn partial_region_skips_straddling_vma() {
        // The middle VMA spans 16..48 MiB: not inside 0..32 MiB.
        let r = GuestRegions::new([(GUEST, 32 * MIB)]).unwrap();
        let g = parse_smaps(FIXTURE.as_bytes(), &r).unwrap().guest_ram;
        assert_eq!(g.vmas, 1);
        assert_eq!(g.rss, 16384 * 1024);
    }

    #[test]
    fn no_ksm_line_is_unavailable() {
        let old: String = FIXTURE
            .lines()
            .filter(|l| !l.starts_with("KSM:"))
            .flat_map(|l| [l, "\n"])
            .collect();
        let g = parse_smaps(old.as_bytes(), &guest()).unwrap().guest_ram;
        assert_eq!(g.ksm, None);
        assert_eq!(g.rss, (16384 + 32768 + 8192) * 1024);
    }

    #[test]
    fn no_guest_vmas() {
        let r = GuestRegions::new([(0x1000, 0x1000)]).unwrap();
        let t = parse_smaps(FIXTURE.as_bytes(), &r).unwrap();
        assert_eq!(t.guest_ram, GuestRamStats::default());
        assert!(t.process_rss > 0);
    }

    #[test]
    fn malformed_lines_are_errors() {
        let r = guest();
        let bad_guest_value = format!(
            "{GUEST:x}-{:x} rw-p 00000000 00:00 0\nRss: lots kB\n",
            GUEST + MIB
        );
        assert!(parse_smaps(bad_guest_value.as_bytes(), &r).is_err());
        assert!(parse_smaps(b"1g00-2000 rw-p\n", &r).is_err());
        assert!(parse_smaps(b"1000-2000 rw-p\nRss: 12 MB\n", &r).is_err());
        assert!(parse_smaps(b"1000-2000 rw-p\nRss: 99999999999999999999 kB\n", &r).is_err());
        // A field without a colon inside guest RAM.
        let no_colon = format!(
            "{GUEST:x}-{:x} rw-p 00000000 00:00 0\nRss 4 kB\n",
            GUEST + MIB
        );
        assert!(parse_smaps(no_colon.as_bytes(), &r).is_err());
    }

    #[test]
    fn non_utf8_mapping_name() {
        let mut text = b"1000-2000 r--p 00000000 fe:00 1 /tmp/\xff\xfe\nRss: 4 kB\n".to_vec();
        text.extend_from_slice(
            format!(
                "{GUEST:x}-{:x} rw-p 00000000 00:00 0\nRss: 8 kB\n",
                GUEST + MIB
            )
            .as_bytes(),
        );
        let t = parse_smaps(&text, &guest()).unwrap();
        assert_eq!(t.guest_ram.rss, 8192);
        assert_eq!(t.process_rss, 12288);
    }

    #[test]
    fn kb_values() {
        assert_eq!(parse_kb(b"                 188 kB"), Some(188 * 1024));
        assert_eq!(parse_kb(b" 0 kB"), Some(0));
        assert_eq!(parse_kb(b" kB"), None);
        assert_eq!(parse_kb(b" 12"), None);
        assert_eq!(
            parse_header(b"5651b2e98000-5651b2ec7000 r--p 0"),
            Some((0x5651b2e98000, 0x5651b2ec7000))
        );
        assert_eq!(
            parse_header(b"ffffffffff600000-ffffffffff601000 --xp"),
            Some((0xffffffffff600000, 0xffffffffff601000))
        );
        assert_eq!(parse_header(b"2000-1000 r--p"), None);
    }
}
