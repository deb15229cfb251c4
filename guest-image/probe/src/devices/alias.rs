//! `blk-alias`, the hostile block mode: a queue full of huge read chains
//! whose data descriptors all alias one guest buffer (see `hostile.rs`).

use super::commands::bad_args;
use super::hostile::{cycles_ms, fail, target};
use super::{Args, Devices, Driver, Kind};
use crate::balloon::MemInfo;
use crate::blk::{self, Blk};
use crate::io::{put_dec, put_str, putc};
use crate::time;
use crate::virtio::{self, Error, DESC_INDIRECT, DESC_NEXT, DESC_WRITE, F_INDIRECT_DESC};
use crate::workload::Region;
use core::sync::atomic::{fence, Ordering};

const PAGE: u64 = 4096;
/// Most chains `blk-alias` queues (the VMM's block queue has 256 entries).
const ALIAS_CHAINS_MAX: u64 = 256;
/// Most data descriptors per chain: with header and status, one 4 KiB
/// indirect table (the VMM's SEG_MAX is 254).
const ALIAS_DESCS_MAX: u64 = 254;
/// Largest aliased buffer, KiB (16 MiB: 254 of them make a ~4 GiB chain).
const ALIAS_KIB_MAX: u64 = 16 << 10;
/// Default and largest `blk-alias` wait, seconds.
const ALIAS_TIMEOUT_S: u64 = 60;
const ALIAS_TIMEOUT_MAX_S: u64 = 3600;
/// Most rounds of one `blk-alias`.
const ALIAS_ROUNDS_MAX: u64 = 1 << 32;

/// What `blk-alias` saw come back.
#[derive(Default)]
struct Tally {
    done: u64,
    ok: u64,
    ioerr: u64,
    unsupp: u64,
    /// Used, but the status byte still holds the probe's 0xff.
    nostatus: u64,
    /// Used entries naming no chain in flight.
    bogus: u64,
    first_cycles: u64,
    cycles: u64,
}

/// `blk-alias <idx> <chains> <descs> <kib> [<timeout_s> [<rounds>]]`:
/// resets block device `idx`, negotiates VIRTIO_F_INDIRECT_DESC, queues
/// `chains` reads of sector 0 at once, each of `descs` data descriptors of
/// `kib` KiB that all point at one buffer (indirect tables; without the
/// feature, direct chains if they fit the queue), notifies once and waits
/// up to `timeout_s` for every chain; `rounds` times over (default 1).
/// Then the device is brought up again for the other commands (after a
/// timeout it is left alone: it still holds chains).
pub fn blk_alias(devs: &mut Devices, args: &Args, mem: &MemInfo, line: &[u8]) {
    let opt = |i: usize, default: u64| {
        if args.count > i {
            args.num(i)
        } else {
            Some(default)
        }
    };
    let (Some(idx), Some(chains), Some(descs), Some(kib), Some(timeout_s), Some(rounds)) = (
        args.num(0),
        args.num(1),
        args.num(2),
        args.num(3),
        opt(4, ALIAS_TIMEOUT_S),
        opt(5, 1),
    ) else {
        return bad_args(line);
    };
    if !(1..=ALIAS_CHAINS_MAX).contains(&chains)
        || !(1..=ALIAS_DESCS_MAX).contains(&descs)
        || !(1..=ALIAS_KIB_MAX).contains(&kib)
        || !(1..=ALIAS_TIMEOUT_MAX_S).contains(&timeout_s)
        || !(1..=ALIAS_ROUNDS_MAX).contains(&rounds)
    {
        return bad_args(line);
    }
    // Rings (3 pages), headers and status bytes (32 bytes a chain: 2
    // pages), one indirect table page per chain, the data buffer.
    let pages = 5 + chains + kib / 4 + u64::from(kib % 4 != 0);
    let Some(scratch) = scratch(mem, pages) else {
        put_str("PROBE ERROR blk-alias: needs ");
        put_dec(pages * 4);
        put_str(" KiB of free RAM in one piece\n");
        return;
    };
    let Some(dev) = target(devs, Kind::Block, idx) else {
        return;
    };
    let Driver::Blk(b) = &mut dev.driver else {
        return;
    };
    let shape = Alias {
        chains,
        descs,
        bytes: kib << 10,
        scratch,
    };
    let (indirect, result) = match shape.run(b, timeout_s, rounds) {
        Ok((indirect, tally, waited)) => (indirect, (tally, waited)),
        Err(AliasError::Device(e)) => return fail(dev, Kind::Block, idx, e),
        Err(AliasError::DoesNotFit(size)) => {
            put_str("PROBE ERROR blk-alias: the chains do not fit a queue of ");
            put_dec(u64::from(size));
            put_str(" entries without VIRTIO_F_INDIRECT_DESC\n");
            if let Err(e) = b.reinit() {
                fail(dev, Kind::Block, idx, e);
            }
            return;
        }
    };
    let (t, waited) = result;
    put_str("PROBE BLK-ALIAS idx=");
    put_dec(idx);
    for (key, v) in [
        ("chains", chains),
        ("descs", descs),
        ("kib", kib),
        ("rounds", rounds),
        ("indirect", u64::from(indirect)),
        ("done", t.done),
        ("ok", t.ok),
        ("ioerr", t.ioerr),
        ("unsupp", t.unsupp),
        ("nostatus", t.nostatus),
        ("bogus", t.bogus),
        ("first_ms", cycles_ms(t.first_cycles)),
        ("ms", cycles_ms(t.cycles)),
    ] {
        putc(b' ');
        put_str(key);
        putc(b'=');
        put_dec(v);
    }
    put_str(if waited.is_ok() {
        " status=ok\n"
    } else {
        " status=timeout\n"
    });
    match waited {
        // The device still holds chains: never touch it again.
        Err(e) => fail(dev, Kind::Block, idx, e),
        Ok(()) => {
            if let Err(e) = b.reinit() {
                fail(dev, Kind::Block, idx, e);
            }
        }
    }
}

/// `pages` contiguous pages at the top of the free pool (the pages the
/// balloon and `touch` use first), zeroed; None if there are not enough in
/// one piece.
fn scratch(mem: &MemInfo, pages: u64) -> Option<u64> {
    let total = mem.pool.pages();
    if total.saturating_sub(mem.free_first) < pages {
        return None;
    }
    let region = Region {
        first: total - pages,
        pages,
    };
    let (addr, len) = mem.pool.spans(region).next()?;
    (len == pages * PAGE).then_some(addr)
}

enum AliasError {
    Device(Error),
    /// Direct chains need more descriptors than a queue of this size has.
    DoesNotFit(u16),
}

impl From<Error> for AliasError {
    fn from(e: Error) -> Self {
        AliasError::Device(e)
    }
}

/// One `blk-alias` attack: the chains' shape and where they live.
struct Alias {
    chains: u64,
    descs: u64,
    bytes: u64,
    /// Rings at +0 (descriptors), +4 KiB (available), +8 KiB (used);
    /// headers at +12 KiB; indirect tables from +20 KiB, one page each; the
    /// data buffer after them.
    scratch: u64,
}

/// Writes descriptor `i` of the table at `table`.
///
/// # Safety
/// The table must be scratch RAM owned by the attack, with room for entry
/// `i`, that the device does not read yet.
unsafe fn put_desc(table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let p = (table + 16 * i) as *mut u8;
    // SAFETY: the caller's contract; fields at 0, 8, 12 and 14.
    unsafe {
        p.cast::<u64>().write_volatile(addr);
        p.add(8).cast::<u32>().write_volatile(len);
        p.add(12).cast::<u16>().write_volatile(flags);
        p.add(14).cast::<u16>().write_volatile(next);
    }
}

impl Alias {
    fn hdr(&self, c: u64) -> u64 {
        self.scratch + 3 * PAGE + 32 * c
    }

    fn table(&self, c: u64) -> u64 {
        self.scratch + 5 * PAGE + c * PAGE
    }

    fn data(&self) -> u64 {
        self.scratch + (5 + self.chains) * PAGE
    }

    /// Runs the attack on `b`'s device, `rounds` times over. Returns
    /// whether the chains were indirect, the tally, and whether every chain
    /// of every round came back in time.
    fn run(
        &self,
        b: &mut Blk,
        timeout_s: u64,
        rounds: u64,
    ) -> Result<(bool, Tally, Result<(), Error>), AliasError> {
        let mmio = &b.mmio;
        let (desc, avail, used) = (self.scratch, self.scratch + PAGE, self.scratch + 2 * PAGE);
        // SAFETY: rings, headers and tables are free pool pages handed to
        // this attack (`scratch`); the device is reset below before it
        // learns their addresses.
        unsafe {
            core::ptr::write_bytes(
                self.scratch as *mut u8,
                0,
                ((5 + self.chains) * PAGE) as usize,
            )
        };
        let features = mmio.begin_init(F_INDIRECT_DESC)?;
        let indirect = features & F_INDIRECT_DESC != 0;
        let size = mmio.setup_raw_queue(0, ALIAS_CHAINS_MAX as u16, desc, avail, used)?;
        let per = self.descs + 2;
        let qsize = u64::from(size);
        if self.chains > qsize || (!indirect && self.chains * per > qsize) {
            return Err(AliasError::DoesNotFit(size));
        }
        mmio.driver_ok();
        self.build(desc, indirect);
        let mut t = Tally::default();
        let mut next_avail = 0u16;
        let mut last = 0u16;
        let t0 = time::rdtsc();
        for _ in 0..rounds {
            for c in 0..self.chains {
                // SAFETY: chain `c`'s status byte, not in flight (the
                // previous round completed).
                unsafe { ((self.hdr(c) + 16) as *mut u8).write_volatile(0xff) };
                let head = if indirect { c } else { c * per };
                let slot = avail + 4 + 2 * u64::from(next_avail % size);
                // SAFETY: a slot of the available ring (ring[] from offset 4)
                // that the device has consumed or never seen.
                unsafe { (slot as *mut u16).write_volatile(head as u16) };
                next_avail = next_avail.wrapping_add(1);
            }
            fence(Ordering::SeqCst);
            // SAFETY: avail->idx at offset 2 of the available ring.
            unsafe { ((avail + 2) as *mut u16).write_volatile(next_avail) };
            fence(Ordering::SeqCst);
            mmio.notify(0);
            let mut seen = [0u64; 4];
            let mut done = 0;
            let waited = virtio::wait(mmio, timeout_s, || {
                loop {
                    // SAFETY: used->idx at offset 2 of the used ring.
                    let idx = unsafe { ((used + 2) as *const u16).read_volatile() };
                    if idx == last {
                        break;
                    }
                    fence(Ordering::Acquire);
                    let e = used + 4 + 8 * u64::from(last % size);
                    // SAFETY: a used->ring[] entry (id at 0) that used->idx
                    // covers.
                    let id = u64::from(unsafe { (e as *const u32).read_volatile() });
                    last = last.wrapping_add(1);
                    let chain = if indirect {
                        Some(id).filter(|&i| i < self.chains)
                    } else {
                        Some(id / per).filter(|&c| id % per == 0 && c < self.chains)
                    };
                    match chain {
                        Some(c) if seen[(c / 64) as usize] & 1 << (c % 64) == 0 => {
                            seen[(c / 64) as usize] |= 1 << (c % 64);
                            done += 1;
                            if t.done + done == 1 {
                                t.first_cycles = time::rdtsc().wrapping_sub(t0);
                            }
                        }
                        _ => t.bogus += 1,
                    }
                }
                done == self.chains
            });
            t.done += done;
            self.count_statuses(&seen, &mut t);
            if waited.is_err() {
                t.cycles = time::rdtsc().wrapping_sub(t0);
                return Ok((indirect, t, waited));
            }
        }
        t.cycles = time::rdtsc().wrapping_sub(t0);
        Ok((indirect, t, Ok(())))
    }

    /// Writes every chain's header and descriptors (once: rounds reuse
    /// them) into the direct table at `desc` or the chains' indirect tables.
    fn build(&self, desc: u64, indirect: bool) {
        let per = self.descs + 2;
        let data = self.data();
        for c in 0..self.chains {
            let hdr = self.hdr(c);
            // SAFETY: chain `c`'s header slot in the scratch header pages,
            // which the device does not read yet.
            unsafe {
                (hdr as *mut u32).write_volatile(blk::T_IN);
                ((hdr + 4) as *mut u32).write_volatile(0);
                ((hdr + 8) as *mut u64).write_volatile(0);
            }
            let (table, first) = if indirect {
                (self.table(c), 0)
            } else {
                (desc, c * per)
            };
            for k in 0..per {
                let i = first + k;
                let (addr, len, flags, next) = match k {
                    0 => (hdr, 16, DESC_NEXT, i + 1),
                    k if k == per - 1 => (hdr + 16, 1, DESC_WRITE, 0),
                    _ => (data, self.bytes as u32, DESC_WRITE | DESC_NEXT, i + 1),
                };
                // SAFETY: entry `i` of this chain's table (an indirect page,
                // or its own run of the direct table: `chains * per` fit).
                unsafe { put_desc(table, i, addr, len, flags, next as u16) };
            }
            if indirect {
                // SAFETY: main descriptor `c` (c < queue size).
                unsafe { put_desc(desc, c, table, (per * 16) as u32, DESC_INDIRECT, 0) };
            }
        }
    }

    /// Counts the status bytes of the chains marked in `seen`.
    fn count_statuses(&self, seen: &[u64; 4], t: &mut Tally) {
        for c in 0..self.chains {
            if seen[(c / 64) as usize] & 1 << (c % 64) == 0 {
                continue;
            }
            // SAFETY: the device has used chain `c`: its status byte is ours.
            match unsafe { ((self.hdr(c) + 16) as *const u8).read_volatile() } {
                0 => t.ok += 1,
                1 => t.ioerr += 1,
                2 => t.unsupp += 1,
                _ => t.nostatus += 1,
            }
        }
    }
}
