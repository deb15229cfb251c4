//! `probe.image=initrd`: replays a captured guest memory image, a
//! `KSMVMRAM` pack (`probe_pattern::pack`) that the VMM loaded verbatim as
//! the initrd. Its shared pages stay as they are (the same in every VM that
//! loads the pack: KSM merges them), its own pages get `probe.seed` in their
//! first word (so VMs do not merge them), and its zero pages are modelled by
//! the caller as touched zero pages of the workload pool.

use crate::boot::{E820, E820_RAM};
use crate::io::{self, put_str};
use probe_pattern::pack::{seed_page, PackError, PackHeader, HEADER_LEN};
use probe_pattern::{Checksum, PAGE_SIZE, PAGE_WORDS};

/// A loaded pack.
pub struct Image {
    header: PackHeader,
    /// Address of the first stored page.
    data: u64,
    seed: u64,
    /// Checksum of the stored pages taken at load (after seeding).
    checksum: u64,
}

/// Prints `PROBE ERROR image: <what>` and powers off.
fn fail(what: impl core::fmt::Display) -> ! {
    use core::fmt::Write;
    put_str("PROBE ERROR image: ");
    let _ = write!(io::Serial, "{what}");
    io::fatal_end()
}

/// Views the stored page at `addr`.
///
/// # Safety
/// `addr` must be a page of the initrd (mapped RAM that nothing else uses),
/// and the returned reference must be the only one to it while it lives.
unsafe fn page_at<'a>(addr: u64) -> &'a mut [u64; PAGE_WORDS] {
    // SAFETY: per the caller's guarantee; the initrd is page-aligned
    // (checked in `load`).
    unsafe { &mut *(addr as *mut [u64; PAGE_WORDS]) }
}

impl Image {
    /// Validates the pack at `addr` (`size` bytes) and takes it over: seeds
    /// its own pages with `seed` and checksums all stored pages. `probe_end`
    /// is the end of the probe's image and DMA arena, `limit` the end of
    /// what the page tables map. Any problem is fatal (`PROBE ERROR image:`).
    pub fn load(
        e820: &E820,
        (addr, size): (u64, u64),
        probe_end: u64,
        limit: u64,
        seed: u64,
    ) -> Image {
        if size == 0 {
            fail("no initrd (ksmvm run --initrd PACK)");
        }
        let end = addr.saturating_add(size);
        if addr % PAGE_SIZE != 0 {
            fail(format_args!("initrd at {addr:#x} is not page-aligned"));
        }
        let in_ram = e820
            .iter()
            .any(|e| e.kind == E820_RAM && e.addr <= addr && end <= e.addr.saturating_add(e.size));
        if !in_ram || end > limit || addr < probe_end {
            fail(format_args!(
                "initrd at {addr:#x}..{end:#x} is not in RAM that the probe can use \
                 (from {probe_end:#x}, below {limit:#x})"
            ));
        }
        // SAFETY: the initrd lies in mapped RAM (checked above) that the
        // probe uses for nothing else, and holds at least HEADER_LEN bytes
        // when size allows (parse checks size before reading).
        let head = unsafe {
            core::slice::from_raw_parts(addr as *const u8, HEADER_LEN.min(size as usize))
        };
        let header = PackHeader::parse(head, size).unwrap_or_else(|e: PackError| fail(e));
        // parse checked that the whole pack fits in `size`, so these do not
        // overflow.
        let table = addr + PAGE_SIZE;
        let data = addr + header.data_offset().unwrap_or(0);
        for index in 0..header.pages {
            // SAFETY: entry `index` lies in the table, inside the initrd.
            let entry = unsafe { ((table + index * 8) as *const u64).read() };
            if let Err(e) = header.check_entry(index, entry) {
                fail(e);
            }
        }
        let mut image = Image {
            header,
            data,
            seed,
            checksum: 0,
        };
        let mut sum = Checksum::new();
        image.for_each_page(|index, page| {
            if index >= header.shared {
                seed_page(page, seed);
            }
            sum.update_page(page);
        });
        image.checksum = sum.finish();
        image
    }

    /// Calls `f(index, page)` for each stored page, in order.
    fn for_each_page(&self, mut f: impl FnMut(u64, &mut [u64; PAGE_WORDS])) {
        for index in 0..self.header.pages {
            // SAFETY: stored page `index` lies inside the initrd (checked in
            // `load`), page-aligned; this is the only reference to it.
            f(index, unsafe { page_at(self.data + index * PAGE_SIZE) });
        }
    }

    pub fn header(&self) -> &PackHeader {
        &self.header
    }

    /// Checksum of the stored pages taken at load.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }

    /// Whether the stored pages are as they were at load: the same
    /// checksum, and every own page still carries the seed.
    pub fn verify(&self) -> bool {
        let mut sum = Checksum::new();
        let mut seeded = true;
        self.for_each_page(|index, page| {
            if index >= self.header.shared {
                seeded &= page[0] == self.seed;
            }
            sum.update_page(page);
        });
        seeded && sum.finish() == self.checksum
    }
}
