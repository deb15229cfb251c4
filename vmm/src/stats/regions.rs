//! The host address ranges of guest RAM, sorted and coalesced so that a
//! VMA spanning two adjacent regions is still recognised as guest RAM.

use super::StatsError;

/// Half-open host virtual address ranges `[start, end)` of guest RAM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestRegions {
    ranges: Vec<(u64, u64)>,
    total: u64,
}

impl GuestRegions {
    /// From `(host start address, length)` pairs, in any order.
    pub fn new(regions: impl IntoIterator<Item = (u64, u64)>) -> Result<Self, StatsError> {
        let mut ranges = Vec::new();
        for (start, len) in regions {
            let bad = |problem| StatsError::Region {
                start,
                len,
                problem,
            };
            if len == 0 {
                return Err(bad("empty"));
            }
            let end = start.checked_add(len).ok_or_else(|| bad("end overflows"))?;
            ranges.push((start, end));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        let mut total = 0;
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start < last.1 => {
                    return Err(StatsError::Region {
                        start,
                        len: end - start,
                        problem: "overlaps another region",
                    })
                }
                Some(last) if start == last.1 => last.1 = end,
                _ => merged.push((start, end)),
            }
            total += end - start;
        }
        Ok(Self {
            ranges: merged,
            total,
        })
    }

    /// Sum of the region lengths, bytes.
    pub fn total_len(&self) -> u64 {
        self.total
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Whether `[start, end)` lies entirely inside one (coalesced) region.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        // The candidate is the last range starting at or before `start`.
        let i = self.ranges.partition_point(|&(s, _)| s <= start);
        i > 0 && end <= self.ranges[i - 1].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_and_contains() {
        let r = GuestRegions::new([(0x3000, 0x1000), (0x1000, 0x2000), (0x10000, 0x1000)]).unwrap();
        assert_eq!(r.ranges(), &[(0x1000, 0x4000), (0x10000, 0x11000)]);
        assert_eq!(r.total_len(), 0x4000);
        assert!(r.contains(0x1000, 0x4000));
        assert!(r.contains(0x2000, 0x3000));
        assert!(!r.contains(0x0, 0x2000));
        assert!(!r.contains(0x3000, 0x5000));
        assert!(!r.contains(0x4000, 0x10000));
        assert!(r.contains(0x10000, 0x11000));
        assert!(!r.contains(0x11000, 0x12000));
    }

    #[test]
    fn rejects_bad_regions() {
        assert!(GuestRegions::new([(0x1000, 0)]).is_err());
        assert!(GuestRegions::new([(u64::MAX, 2)]).is_err());
        assert!(GuestRegions::new([(0x1000, 0x2000), (0x2000, 0x1000)]).is_err());
        assert_eq!(GuestRegions::new([]).unwrap().total_len(), 0);
    }
}
