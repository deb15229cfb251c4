//! The memory workload: regions carved from e820 RAM, filled with the
//! `probe-pattern` content, checksummed and verified.

use crate::boot::{E820, E820_MAX, E820_RAM};
use crate::paging::{MMIO_GAP_END, MMIO_GAP_START};
use probe_pattern::{fill_page, Checksum, PAGE_SIZE, PAGE_WORDS};

/// RAM available to the workload: page-aligned, address-ordered ranges.
pub struct Pool {
    ranges: [(u64, u64); E820_MAX],
    count: usize,
}

/// A run of pages of the pool (pool page indices `first..first + pages`).
#[derive(Clone, Copy)]
pub struct Region {
    pub first: u64,
    pub pages: u64,
}

impl Pool {
    /// The e820 RAM at or above `start` and below `limit`, minus the MMIO
    /// gap and `hole` (start, end: the initrd; empty if start == end),
    /// shrunk to whole pages and sorted by address.
    pub fn new(e820: &E820, start: u64, limit: u64, hole: (u64, u64)) -> Pool {
        let mut pool = Pool {
            ranges: [(0, 0); E820_MAX],
            count: 0,
        };
        // The hole, rounded out to whole pages.
        let hole = (
            hole.0 & !(PAGE_SIZE - 1),
            hole.1.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1),
        );
        for e in e820.iter().filter(|e| e.kind == E820_RAM) {
            let end = e.addr.saturating_add(e.size).min(limit);
            let begin = e.addr.max(start);
            // Cut out the MMIO gap (should the map overlap it) and the hole:
            // at most three pieces are left.
            let mut pieces = [(0u64, 0u64); 4];
            let mut n = 0;
            for (b, en) in [
                (begin, end.min(MMIO_GAP_START)),
                (begin.max(MMIO_GAP_END), end),
            ] {
                for (b, en) in [(b, en.min(hole.0)), (b.max(hole.1), en)] {
                    let b = b.next_multiple_of(PAGE_SIZE);
                    let en = en & !(PAGE_SIZE - 1);
                    if b < en {
                        pieces[n] = (b, en);
                        n += 1;
                    }
                }
            }
            for &piece in &pieces[..n] {
                pool.ranges[pool.count] = piece;
                pool.count += 1;
            }
            if pool.count + pieces.len() > E820_MAX {
                break;
            }
        }
        pool.ranges[..pool.count].sort_unstable_by_key(|r| r.0);
        pool
    }

    /// Pages in the pool.
    pub fn pages(&self) -> u64 {
        self.ranges[..self.count]
            .iter()
            .map(|(b, e)| (e - b) / PAGE_SIZE)
            .sum()
    }

    /// The address of pool page `index` (< `pages()`).
    pub fn page_addr(&self, mut index: u64) -> u64 {
        for &(b, e) in &self.ranges[..self.count] {
            let n = (e - b) / PAGE_SIZE;
            if index < n {
                return b + index * PAGE_SIZE;
            }
            index -= n;
        }
        unreachable!("pool page out of range")
    }

    /// The contiguous physical ranges (address, bytes) of `region`, in
    /// order.
    pub fn spans(&self, region: Region) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut skip = region.first;
        let mut left = region.pages;
        self.ranges[..self.count].iter().filter_map(move |&(b, e)| {
            let n = (e - b) / PAGE_SIZE;
            if skip >= n {
                skip -= n;
                return None;
            }
            let take = (n - skip).min(left);
            let start = b + skip * PAGE_SIZE;
            skip = 0;
            left -= take;
            (take > 0).then_some((start, take * PAGE_SIZE))
        })
    }

    /// Calls `f(index, address)` for each page of `region`, in order
    /// (`index` counts from 0 within the region).
    fn for_each_page(&self, region: Region, mut f: impl FnMut(u64, u64)) {
        let mut skip = region.first;
        let mut index = 0;
        for &(b, e) in &self.ranges[..self.count] {
            let n = (e - b) / PAGE_SIZE;
            if skip >= n {
                skip -= n;
                continue;
            }
            let mut addr = b + skip * PAGE_SIZE;
            skip = 0;
            while addr < e {
                if index == region.pages {
                    return;
                }
                f(index, addr);
                index += 1;
                addr += PAGE_SIZE;
            }
        }
    }
}

/// Views the pool page at `addr`.
///
/// # Safety
/// `addr` must be a page of the pool (mapped RAM used by nothing else), and
/// the returned reference must be the only one to it while it lives.
unsafe fn page_at<'a>(addr: u64) -> &'a mut [u64; PAGE_WORDS] {
    // SAFETY: per the caller's guarantee; pages are 4 KiB-aligned.
    unsafe { &mut *(addr as *mut [u64; PAGE_WORDS]) }
}

/// Writes the content of `region` and returns its checksum.
pub fn fill(pool: &Pool, region: Region, domain: u64, seed: u64) -> u64 {
    let mut sum = Checksum::new();
    pool.for_each_page(region, |index, addr| {
        // SAFETY: `addr` is a pool page, above the image and boot data, and
        // this is the only reference to it.
        let page = unsafe { page_at(addr) };
        fill_page(domain, seed, index, page);
        sum.update_page(page);
    });
    sum.finish()
}

/// Re-reads `region`: its checksum, and whether every page still holds the
/// generator's content.
pub fn verify(pool: &Pool, region: Region, domain: u64, seed: u64) -> (u64, bool) {
    let mut sum = Checksum::new();
    let mut ok = true;
    let mut expected = [0u64; PAGE_WORDS];
    pool.for_each_page(region, |index, addr| {
        // SAFETY: as in `fill`.
        let page = unsafe { page_at(addr) };
        fill_page(domain, seed, index, &mut expected);
        ok &= *page == expected;
        sum.update_page(page);
    });
    (sum.finish(), ok)
}

/// Writes a zero word into every page of `region` (touched zero pages).
pub fn touch_zero(pool: &Pool, region: Region) {
    pool.for_each_page(region, |_, addr| {
        // SAFETY: `addr` is a pool page (as in `fill`); a volatile store so
        // that the touch is never optimised away.
        unsafe { (addr as *mut u64).write_volatile(0) };
    });
}
