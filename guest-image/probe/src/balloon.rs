//! virtio-balloon (5.5): follows the device's `num_pages` with 4 KiB pages
//! from the top of the workload pool (pages no workload region uses),
//! answers the stats queue, and reports free pages on request.
//!
//! Queue numbering: inflateq 0, deflateq 1, then statsq and reporting_vq in
//! that order, each present only when its feature was negotiated (Linux's
//! and QEMU's numbering; the probe never negotiates FREE_PAGE_HINT).

use crate::virtio::{self, Arena, Error, Mmio, Virtq};
use crate::workload::Pool;

const F_MUST_TELL_HOST: u64 = 1 << 0;
const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_REPORTING: u64 = 1 << 5;

const CFG_NUM_PAGES: usize = 0;
const CFG_ACTUAL: usize = 4;

/// PFNs per inflate/deflate request (Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX).
const PFNS_PER_REQ: u64 = 256;
/// Requests in flight at once (one PFN page holds four).
const REQS: u64 = 4;
/// Largest range in one free page report descriptor.
const REPORT_CHUNK: u64 = 2 << 20;
/// Most descriptors in one report (Linux's PAGE_REPORTING_CAPACITY).
const REPORT_BATCH: usize = 32;
const TIMEOUT_S: u64 = 10;

const S_MEMFREE: u16 = 4;
const S_MEMTOT: u16 = 5;
const S_AVAIL: u16 = 6;
/// `struct virtio_balloon_stat` is packed: le16 tag, le64 val.
const STAT_LEN: u64 = 10;
const NSTATS: u64 = 3;

/// What the balloon needs to know about the probe's memory.
pub struct MemInfo<'a> {
    pub pool: &'a Pool,
    /// Pool pages from this index up belong to no workload region: the
    /// balloon takes them from the top down.
    pub free_first: u64,
    /// Bytes of e820 RAM.
    pub ram_bytes: u64,
    /// Workload pages reported free (`free-report`), which the probe no
    /// longer uses.
    pub reported_pages: u64,
}

impl MemInfo<'_> {
    /// Pages the balloon may take.
    fn balloonable(&self) -> u64 {
        self.pool.pages().saturating_sub(self.free_first)
    }

    /// Balloon page `k` (the k-th page taken): pool page `pages - 1 - k`.
    fn balloon_page(&self, k: u64) -> u64 {
        self.pool.page_addr(self.pool.pages() - 1 - k)
    }
}

pub struct Balloon {
    pub mmio: Mmio,
    inflate: Virtq,
    deflate: Virtq,
    stats: Option<Virtq>,
    report: Option<Virtq>,
    /// REQS arrays of PFNS_PER_REQ le32 PFNs, 1 KiB apart.
    pfns: u64,
    /// The stats buffer (NSTATS entries).
    stats_buf: u64,
    /// Pages in the balloon (the ones `balloon_page(0..actual)`).
    pub actual: u64,
}

impl Balloon {
    pub fn init(mmio: Mmio, arena: &mut Arena) -> Result<Balloon, (Mmio, Error)> {
        match Self::try_init(&mmio, arena) {
            Ok((inflate, deflate, stats, report, pfns, stats_buf)) => {
                // Adjust to num_pages at the first service.
                mmio.note_config_change();
                Ok(Balloon {
                    mmio,
                    inflate,
                    deflate,
                    stats,
                    report,
                    pfns,
                    stats_buf,
                    actual: 0,
                })
            }
            Err(e) => Err((mmio, e)),
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_init(
        mmio: &Mmio,
        arena: &mut Arena,
    ) -> Result<(Virtq, Virtq, Option<Virtq>, Option<Virtq>, u64, u64), Error> {
        let features =
            mmio.begin_init(F_MUST_TELL_HOST | F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING)?;
        let inflate = mmio.setup_queue(0, 8, arena)?;
        let deflate = mmio.setup_queue(1, 8, arena)?;
        let mut next = 2;
        let mut stats = None;
        if features & F_STATS_VQ != 0 {
            stats = Some(mmio.setup_queue(next, 2, arena)?);
            next += 1;
        }
        let mut report = None;
        if features & F_REPORTING != 0 {
            report = Some(mmio.setup_queue(next, REPORT_BATCH as u16, arena)?);
        }
        let pfns = arena.alloc(4096)?;
        let stats_buf = arena.alloc(4096)?;
        mmio.driver_ok();
        Ok((inflate, deflate, stats, report, pfns, stats_buf))
    }

    /// The device's target (num_pages).
    pub fn target(&self) -> u64 {
        u64::from(self.mmio.config_u32(CFG_NUM_PAGES))
    }

    /// Whether free page reporting was negotiated.
    pub fn can_report(&self) -> bool {
        self.report.is_some()
    }

    /// Inflates or deflates until `actual` is `num_pages` (or every page
    /// the balloon may take), then writes `actual` to the config space.
    pub fn adjust(&mut self, mem: &MemInfo) -> Result<(), Error> {
        loop {
            let want = self.target().min(mem.balloonable());
            if want == self.actual {
                return Ok(());
            }
            let inflate = want > self.actual;
            let total = want.abs_diff(self.actual);
            let q = if inflate {
                &mut self.inflate
            } else {
                &mut self.deflate
            };
            let (mut reqs, mut moved) = (0u64, 0u64);
            while reqs < REQS && moved < total && q.num_free() > 0 {
                let n = PFNS_PER_REQ.min(total - moved);
                let buf = self.pfns + reqs * PFNS_PER_REQ * 4;
                for j in 0..n {
                    let k = if inflate {
                        self.actual + moved + j
                    } else {
                        self.actual - 1 - moved - j
                    };
                    let pfn = (mem.balloon_page(k) >> 12) as u32;
                    // SAFETY: PFN array `reqs` lies in our PFN page (arena
                    // RAM); the device has used every earlier request.
                    unsafe { ((buf + 4 * j) as *mut u32).write_volatile(pfn) };
                }
                q.push(&[(buf, (4 * n) as u32, false)]);
                moved += n;
                reqs += 1;
            }
            q.kick();
            let mut used = 0;
            virtio::wait(&self.mmio, TIMEOUT_S, || {
                while q.pop_used().is_some() {
                    used += 1;
                }
                used == reqs
            })?;
            self.actual = if inflate {
                self.actual + moved
            } else {
                self.actual - moved
            };
            self.mmio.write_config_u32(CFG_ACTUAL, self.actual as u32);
        }
    }

    fn fill_stats(&self, mem: &MemInfo) {
        let free = (mem.balloonable().saturating_sub(self.actual) + mem.reported_pages) * 4096;
        for (i, (tag, val)) in [
            (S_MEMFREE, free),
            (S_MEMTOT, mem.ram_bytes),
            (S_AVAIL, free),
        ]
        .into_iter()
        .enumerate()
        {
            let at = self.stats_buf + STAT_LEN * i as u64;
            // SAFETY: the stats buffer is our arena page; the device does
            // not hold it while the probe refills it.
            unsafe {
                (at as *mut u16).write_unaligned(tag);
                ((at + 2) as *mut u64).write_unaligned(val);
            }
        }
    }

    /// Puts the stats buffer on the stats queue (at start, and whenever the
    /// device gave it back to ask for fresh figures).
    fn post_stats(&mut self, mem: &MemInfo) {
        self.fill_stats(mem);
        if let Some(q) = self.stats.as_mut() {
            q.push(&[(self.stats_buf, (STAT_LEN * NSTATS) as u32, false)]);
            q.kick();
        }
    }

    /// Posts the first stats buffer (after DRIVER_OK, once the workload
    /// layout is known).
    pub fn start(&mut self, mem: &MemInfo) {
        self.post_stats(mem);
    }

    /// Follows num_pages on a config change and answers stats requests.
    pub fn service(&mut self, mem: &MemInfo) -> Result<(), Error> {
        if self.mmio.take_config_change() {
            self.adjust(mem)?;
        }
        let asked = match self.stats.as_mut() {
            Some(q) => {
                let mut any = false;
                while q.pop_used().is_some() {
                    any = true;
                }
                any
            }
            None => false,
        };
        if asked {
            self.post_stats(mem);
        }
        Ok(())
    }

    /// Reports the page-aligned ranges `spans` (address, bytes) as free, in
    /// requests of up to 32 ranges of up to 2 MiB each, and waits until the
    /// device has used every request.
    pub fn report(&mut self, spans: impl Iterator<Item = (u64, u64)>) -> Result<(), Error> {
        let Some(q) = self.report.as_mut() else {
            return Ok(());
        };
        let batch = REPORT_BATCH.min(usize::from(q.size));
        let mut bufs = [(0u64, 0u32, true); REPORT_BATCH];
        let mut n = 0;
        let flush = |bufs: &[(u64, u32, bool)], q: &mut Virtq| -> Result<(), Error> {
            q.push(bufs);
            q.kick();
            virtio::wait(&self.mmio, TIMEOUT_S, || {
                while q.pop_used().is_some() {}
                q.num_free() == q.size
            })
        };
        for (mut addr, mut len) in spans {
            while len > 0 {
                let l = len.min(REPORT_CHUNK);
                bufs[n] = (addr, l as u32, true);
                n += 1;
                if n == batch {
                    flush(&bufs[..n], q)?;
                    n = 0;
                }
                addr += l;
                len -= l;
            }
        }
        if n > 0 {
            flush(&bufs[..n], q)?;
        }
        Ok(())
    }
}
