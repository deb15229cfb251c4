//! What the virtio fuzz targets share: a guest memory with holes, split
//! queues built from fuzz input, and an oracle.
//!
//! Each target brings a real device model up through its virtio-mmio
//! registers (ksmvm's own unit-test harness, `test_util::Harness`), then
//! feeds it batches of descriptor chains the fuzzer describes. Before a
//! batch is kicked, the oracle walks every chain with a shadow
//! `virtio_queue::Queue` over the same rings (the view any device has of
//! the chain) and snapshots guest memory. Afterwards the targets check,
//! besides "no panic":
//!
//! * the used ring returns exactly the chains that were made available, in
//!   order, and each used length is at most the chain's writable bytes;
//! * nothing in guest memory changed outside the chains' writable buffers,
//!   the used ring, and whatever the device documents (the balloon's
//!   discarded pages);
//! * a corrupt available index stops the device with DEVICE_NEEDS_RESET and
//!   serves nothing, and any other input leaves it active;
//! * the device serves a well-formed request afterwards, both as it is and
//!   after a reset.
//!
//! Memory map (guest physical):
//!
//! ```text
//! 0x00_0000 .. 0x04_0000   data (RAM)
//! 0x04_0000 .. 0x10_0000   hole
//! 0x10_0000 .. 0x14_0000   data (RAM)
//! 0x14_0000 .. 0x20_0000   hole
//! 0x20_0000 .. 0x24_0000   rings: queue i in the 64 KiB slot at 0x20_0000 + i * 0x1_0000
//!                          (descriptor table, available ring, used ring at +0x8000,
//!                          indirect tables at +0x9000)
//! ```
//!
//! The rings sit in a region of their own, so that a writable buffer that
//! does not start in it cannot reach it. Unless the input asks for chaos,
//! writable buffers that would land in the rings are moved to the data
//! area, so the device never rewrites the chains it is walking and the
//! oracle stays exact. In chaos mode anything goes and only "no panic" and
//! "serves well-formed requests after a reset" are checked.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
pub use ksmvm::devices::virtio::mmio::REG_STATUS;
pub use ksmvm::devices::virtio::test_util::{GuestQueue, Harness};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const DATA0: u64 = 0;
pub const DATA1: u64 = 0x10_0000;
pub const DATA_LEN: u64 = 0x4_0000;
pub const RINGS: u64 = 0x20_0000;
pub const SLOT: u64 = 0x1_0000;
pub const MAX_QUEUES: usize = 4;
pub const RINGS_END: u64 = RINGS + SLOT * MAX_QUEUES as u64;
/// Where a queue's indirect tables start, within its slot.
const INDIRECT: u64 = 0x9000;
pub const PAGE: u64 = 4096;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const IND: u16 = VRING_DESC_F_INDIRECT as u16;

/// The guest memory, all zero. One mapping per process, zeroed for every
/// input: a fresh mmap per input would cost more in page faults than the
/// device spends on the input.
pub fn guest_memory() -> Arc<GuestMemoryMmap> {
    static MEM: OnceLock<Arc<GuestMemoryMmap>> = OnceLock::new();
    let mem = MEM
        .get_or_init(|| {
            Arc::new(
                GuestMemoryMmap::from_ranges(&[
                    (GuestAddress(DATA0), DATA_LEN as usize),
                    (GuestAddress(DATA1), DATA_LEN as usize),
                    (GuestAddress(RINGS), (RINGS_END - RINGS) as usize),
                ])
                .expect("guest memory"),
            )
        })
        .clone();
    for &(a, l) in &REGIONS {
        zero(&mem, a, l);
    }
    mem
}

/// Zeroes `[addr, addr + len)`, which must lie in one region.
pub fn zero(mem: &GuestMemoryMmap, addr: u64, len: u64) {
    assert!(REGIONS
        .iter()
        .any(|&(a, l)| addr >= a && addr + len <= a + l));
    let p = mem.get_host_address(GuestAddress(addr)).unwrap();
    // SAFETY: the range lies inside one mapped region (checked above), and
    // the single-threaded harness is the only one touching guest memory.
    unsafe { std::ptr::write_bytes(p, 0, len as usize) };
}

/// True if `[a, a + len)` meets `[b, b + blen)` (ranges may wrap past
/// u64::MAX; a wrapping range is treated as reaching to the end).
pub fn overlaps(a: u64, len: u64, b: u64, blen: u64) -> bool {
    if len == 0 || blen == 0 {
        return false;
    }
    let a_end = a.saturating_add(len);
    let b_end = b.saturating_add(blen);
    a < b_end && b < a_end
}

pub fn in_rings(addr: u64, len: u64) -> bool {
    overlaps(addr, len, RINGS, RINGS_END - RINGS)
}

/// A guest address, in forms that reach the interesting places.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    Data0(u32),
    Data1(u32),
    /// Just before the end of a data region (buffers that run off it).
    EndOf0(u16),
    EndOf1(u16),
    Hole(u32),
    Rings(u32),
    EndOfMem(u16),
    Raw(u64),
}

impl Addr {
    pub fn resolve(self) -> u64 {
        match self {
            Addr::Data0(o) => DATA0 + u64::from(o) % DATA_LEN,
            Addr::Data1(o) => DATA1 + u64::from(o) % DATA_LEN,
            Addr::EndOf0(o) => DATA0 + DATA_LEN - 1 - u64::from(o) % PAGE,
            Addr::EndOf1(o) => DATA1 + DATA_LEN - 1 - u64::from(o) % PAGE,
            Addr::Hole(o) => DATA0 + DATA_LEN + u64::from(o) % (DATA1 - DATA_LEN),
            Addr::Rings(o) => RINGS + u64::from(o) % (RINGS_END - RINGS),
            Addr::EndOfMem(o) => RINGS_END - 1 - u64::from(o) % PAGE,
            Addr::Raw(a) => a,
        }
    }
}

/// A buffer length.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Small(u16),
    /// Whole 512-byte sectors (0..=129).
    Sectors(u8),
    Word(u16),
    Raw(u32),
    /// Exactly the length of the buffer's content (0 without content).
    Fit,
}

impl Len {
    /// The length; `fit` is the length of the buffer's content, if any.
    pub fn resolve(self, fit: Option<usize>) -> u32 {
        match self {
            Len::Small(n) => u32::from(n) % 0x400,
            Len::Sectors(n) => u32::from(n) % 130 * 512,
            Len::Word(n) => u32::from(n),
            Len::Raw(n) => n,
            Len::Fit => fit.unwrap_or(0) as u32,
        }
    }
}

/// What the target may put in a buffer before the chain is made available
/// (a request header, a PFN list, ...).
pub trait Content {
    fn bytes(&self) -> Vec<u8>;
}

fn fit<C: Content>(c: &Option<C>) -> Option<usize> {
    c.as_ref().map(|c| c.bytes().len())
}

/// Plain bytes, for targets without structured content.
#[derive(Arbitrary, Debug, Clone)]
pub struct RawBytes(pub Vec<u8>);

impl Content for RawBytes {
    fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub struct DescSpec<C> {
    pub addr: Addr,
    pub len: Len,
    pub write: bool,
    pub content: Option<C>,
}

/// A descriptor written as is (flags and next included), for chains no
/// driver builds: loops, bad indices, nested indirect tables.
#[derive(Arbitrary, Debug, Clone)]
pub struct RawDesc<C> {
    pub addr: Addr,
    pub len: Len,
    pub flags: u16,
    pub next: u16,
    pub content: Option<C>,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum ChainSpec<C> {
    /// Consecutive descriptors linked with NEXT.
    Direct(Vec<DescSpec<C>>),
    /// One descriptor pointing at an indirect table holding these.
    Indirect(Vec<DescSpec<C>>),
    /// Direct descriptors, the last of which points at an indirect table.
    DirectThenIndirect(Vec<DescSpec<C>>, Vec<DescSpec<C>>),
    /// Raw descriptors in consecutive table slots; the head is the first.
    Raw(Vec<RawDesc<C>>),
    /// Makes this head available again, whatever it is now (past the
    /// queue, or a chain already used).
    Head(u16),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct MemWrite<C> {
    pub addr: Addr,
    pub content: C,
}

/// Chains added to one queue and made available together, then one kick.
#[derive(Arbitrary, Debug, Clone)]
pub struct Batch<C> {
    pub queue: u8,
    pub writes: Vec<MemWrite<C>>,
    pub chains: Vec<ChainSpec<C>>,
    /// Moves the available index by this much after the chains: small
    /// values re-serve stale ring entries, large ones corrupt the ring.
    pub avail_skew: Option<u16>,
}

/// A chain as virtio-queue walks it, before the device runs.
#[derive(Debug, Clone)]
pub struct ChainInfo {
    pub head: u16,
    /// (addr, len, writable) of every descriptor the walk yields.
    pub descs: Vec<(u64, u32, bool)>,
    /// Total length of the writable descriptors: what the device may
    /// report as written.
    pub writable_bytes: u64,
}

impl ChainInfo {
    pub fn writable(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.descs
            .iter()
            .filter(|d| d.2)
            .map(|&(a, l, _)| (a, u64::from(l)))
    }

    pub fn readable(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.descs
            .iter()
            .filter(|d| !d.2)
            .map(|&(a, l, _)| (a, u64::from(l)))
    }
}

/// A chain the oracle walked, and virtio-queue's handle on it.
pub struct Walked<'m> {
    pub info: ChainInfo,
    pub chain: DescriptorChain<&'m GuestMemoryMmap>,
}

/// The oracle's view of a submitted batch.
pub enum Submitted<'m> {
    /// The available index is more than a queue ahead: the device must stop.
    Corrupt,
    /// The chains the device will pop, in order (heads past the queue
    /// included: the device pops them but cannot return them).
    Chains(Vec<Walked<'m>>),
}

/// The regions of guest RAM: (guest address, length).
pub const REGIONS: [(u64, u64); 3] = [
    (DATA0, DATA_LEN),
    (DATA1, DATA_LEN),
    (RINGS, RINGS_END - RINGS),
];

/// Guest RAM as one host slice per region.
fn host_view(mem: &GuestMemoryMmap) -> Vec<(u64, &[u8])> {
    REGIONS
        .iter()
        .map(|&(a, l)| {
            let p = mem.get_host_address(GuestAddress(a)).unwrap();
            // SAFETY: the region is mapped for `l` bytes at `p` as long as
            // `mem` lives, and nothing writes guest memory while the
            // (single-threaded) harness reads it: the device only runs
            // inside the harness's own calls.
            (a, unsafe { std::slice::from_raw_parts(p, l as usize) })
        })
        .collect()
}

/// Guest memory as it was before a batch.
pub struct Snapshot(Vec<(u64, Vec<u8>)>);

thread_local! {
    /// Snapshot buffers, reused (allocating them is mostly page faults).
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

impl Snapshot {
    pub fn take(mem: &GuestMemoryMmap) -> Snapshot {
        Snapshot(
            host_view(mem)
                .into_iter()
                .map(|(a, s)| {
                    let mut v = SPARE.with(|p| p.borrow_mut().pop()).unwrap_or_default();
                    v.clear();
                    v.extend_from_slice(s);
                    (a, v)
                })
                .collect(),
        )
    }

    /// The first byte that changed and is in none of the `allowed` ranges.
    pub fn changed_outside(&self, mem: &GuestMemoryMmap, allowed: &[(u64, u64)]) -> Option<u64> {
        const CHUNK: usize = 512;
        for ((base, before), (_, now)) in self.0.iter().zip(host_view(mem)) {
            for (i, (b, n)) in before.chunks(CHUNK).zip(now.chunks(CHUNK)).enumerate() {
                if b == n {
                    continue;
                }
                for (j, (x, y)) in b.iter().zip(n).enumerate() {
                    let gpa = base + (i * CHUNK + j) as u64;
                    if x != y && !allowed.iter().any(|&(a, l)| overlaps(gpa, 1, a, l)) {
                        return Some(gpa);
                    }
                }
            }
        }
        None
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        SPARE.with(|p| p.borrow_mut().extend(self.0.drain(..).map(|(_, v)| v)));
    }
}

/// One of the device's queues as the fuzzing driver keeps it.
pub struct DriverQueue<'m> {
    pub gq: GuestQueue<'m>,
    pub shadow: Queue,
    slot: u64,
    next_indirect: u64,
}

impl<'m> DriverQueue<'m> {
    /// A queue of `size` in slot `index`, its memory cleared.
    pub fn new(mem: &'m GuestMemoryMmap, index: usize, size: u16, event_idx: bool) -> Self {
        let slot = RINGS + SLOT * index as u64;
        zero(mem, slot, SLOT);
        let gq = GuestQueue::new(mem, slot, size);
        let mut shadow = Queue::new(size).unwrap();
        shadow.set_size(size);
        shadow
            .try_set_desc_table_address(gq.mock.desc_table_addr())
            .unwrap();
        shadow
            .try_set_avail_ring_address(gq.mock.avail_addr())
            .unwrap();
        shadow.try_set_used_ring_address(gq.used_addr).unwrap();
        shadow.set_event_idx(event_idx);
        shadow.set_ready(true);
        DriverQueue {
            gq,
            shadow,
            slot,
            next_indirect: slot + INDIRECT,
        }
    }

    /// The used ring, with its trailing avail_event.
    pub fn used_ring_range(&self) -> (u64, u64) {
        (self.gq.used_addr.0, 6 + 8 * u64::from(self.gq.size))
    }
}

/// A device brought up through its registers, and its queues.
pub struct Driver<'m> {
    pub h: Harness,
    pub mem: &'m GuestMemoryMmap,
    pub queues: Vec<DriverQueue<'m>>,
    pub chaos: bool,
    /// Keep readable buffers out of the rings too (unless chaos): for
    /// devices whose behaviour depends on what they read (TX frames, PFN
    /// lists), since the device itself writes the used ring while it works.
    pub readable_outside_rings: bool,
    pub features: u64,
    sizes: Vec<u16>,
}

/// Queue size from a fuzz byte: a power of two in 2..=max.
pub fn queue_size(b: u8, max: u16) -> u16 {
    let max_log = 15 - max.leading_zeros() as u16;
    1 << (1 + u16::from(b) % max_log)
}

impl<'m> Driver<'m> {
    /// Activates the device behind `h` with `features` (masked to what it
    /// offers) and `sizes.len()` queues.
    pub fn new(
        mut h: Harness,
        mem: &'m GuestMemoryMmap,
        features: u64,
        sizes: &[u16],
        chaos: bool,
    ) -> Self {
        let features = features & h.device_features();
        let queues = Self::make_queues(mem, sizes, features);
        {
            let refs: Vec<&GuestQueue<'_>> = queues.iter().map(|q| &q.gq).collect();
            h.activate(features, &refs);
        }
        Driver {
            h,
            mem,
            queues,
            chaos,
            readable_outside_rings: false,
            features,
            sizes: sizes.to_vec(),
        }
    }

    fn make_queues(mem: &'m GuestMemoryMmap, sizes: &[u16], features: u64) -> Vec<DriverQueue<'m>> {
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| DriverQueue::new(mem, i, s, event_idx))
            .collect()
    }

    pub fn is_active(&self) -> bool {
        self.h.transport.is_active()
    }

    pub fn needs_reset(&mut self) -> bool {
        self.h.read32(REG_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

    /// Resets the device and brings it up again on fresh, empty rings.
    pub fn reset_and_reactivate(&mut self) {
        self.h.write32(REG_STATUS, 0);
        assert_eq!(
            self.h.read32(REG_STATUS),
            0,
            "reset did not clear the status"
        );
        assert!(!self.is_active());
        self.queues = Self::make_queues(self.mem, &self.sizes, self.features);
        let refs: Vec<&GuestQueue<'_>> = self.queues.iter().map(|q| &q.gq).collect();
        self.h.activate(self.features, &refs);
    }

    /// A writable buffer (or any, see `readable_outside_rings`) that would
    /// reach the rings goes to the data area (shortened if it would still
    /// run into them).
    fn place(&self, addr: u64, len: u32, write: bool) -> (u64, u32) {
        let protect = write || self.readable_outside_rings;
        if !protect || self.chaos || !in_rings(addr, u64::from(len)) {
            return (addr, len);
        }
        let addr = DATA0 + addr % DATA_LEN;
        if in_rings(addr, u64::from(len)) {
            (addr, (RINGS - addr) as u32)
        } else {
            (addr, len)
        }
    }

    fn fill<C: Content>(&self, addr: u64, len: u32, content: &Option<C>) {
        if let Some(c) = content {
            let mut b = c.bytes();
            b.truncate(len as usize);
            self.write_mem(addr, &b);
        }
    }

    /// Writes guest memory where it is RAM (and, unless chaos, not rings).
    pub fn write_mem(&self, addr: u64, b: &[u8]) {
        if b.is_empty() || (!self.chaos && in_rings(addr, b.len() as u64)) {
            return;
        }
        let _ = self.mem.write_slice(b, GuestAddress(addr));
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Writes an indirect table of `descs` into the queue's indirect area;
    /// returns (address, byte length), or None when the area is full.
    fn indirect_table<C: Content>(
        &mut self,
        q: usize,
        descs: &[DescSpec<C>],
    ) -> Option<(u64, u32)> {
        let n = descs.len().min(64) as u64;
        let at = self.queues[q].next_indirect;
        if at + 16 * n > self.queues[q].slot + SLOT {
            return None;
        }
        self.queues[q].next_indirect += 16 * n.max(1);
        for (i, d) in descs.iter().take(n as usize).enumerate() {
            let (addr, len) = self.place(d.addr.resolve(), d.len.resolve(fit(&d.content)), d.write);
            self.fill(addr, len, &d.content);
            let last = i as u64 + 1 == n;
            let flags = if d.write { WRITE } else { 0 } | if last { 0 } else { NEXT };
            let raw = Self::raw(addr, len, flags, if last { 0 } else { i as u16 + 1 });
            self.mem
                .write_obj(raw, GuestAddress(at + 16 * i as u64))
                .unwrap();
        }
        Some((at, (16 * n) as u32))
    }

    /// Adds the batch's chains to its queue, makes them available and asks
    /// the oracle what the device will see. Returns None if the batch names
    /// no queue the device has.
    pub fn submit<C: Content>(&mut self, b: &Batch<C>) -> (usize, Submitted<'m>) {
        let q = usize::from(b.queue) % self.queues.len();
        for w in &b.writes {
            self.write_mem(w.addr.resolve(), &w.content.bytes());
        }
        let size = self.queues[q].gq.size;
        self.queues[q].next_indirect = self.queues[q].slot + INDIRECT;
        // Every earlier chain has been served: start at slot 0 again.
        self.queues[q].gq.alloc(size);
        // Descriptor slots used by this batch: never more than the table,
        // so that no chain in the batch overwrites another.
        let mut used_slots: u32 = 0;
        for spec in &b.chains {
            let need = match spec {
                ChainSpec::Direct(d) => d.len().max(1),
                ChainSpec::Indirect(_) => 1,
                ChainSpec::DirectThenIndirect(d, _) => d.len() + 1,
                ChainSpec::Raw(d) => d.len().max(1),
                ChainSpec::Head(_) => 0,
            } as u32;
            if used_slots + need > u32::from(size) {
                break;
            }
            used_slots += need;
            match spec {
                ChainSpec::Head(h) => self.queues[q].gq.push_avail(*h),
                ChainSpec::Direct(d) => {
                    let first = self.queues[q].gq.alloc(need as u16);
                    for (i, s) in d.iter().enumerate() {
                        let (addr, len) =
                            self.place(s.addr.resolve(), s.len.resolve(fit(&s.content)), s.write);
                        self.fill(addr, len, &s.content);
                        let last = i + 1 == d.len();
                        let flags = if s.write { WRITE } else { 0 } | if last { 0 } else { NEXT };
                        let next = if last { 0 } else { first + i as u16 + 1 };
                        self.queues[q]
                            .gq
                            .set_desc(first + i as u16, addr, len, flags, next);
                    }
                    if d.is_empty() {
                        self.queues[q].gq.set_desc(first, DATA0, 0, 0, 0);
                    }
                    self.queues[q].gq.push_avail(first);
                }
                ChainSpec::Indirect(d) => {
                    let Some((at, len)) = self.indirect_table(q, d) else {
                        continue;
                    };
                    let first = self.queues[q].gq.alloc(1);
                    self.queues[q].gq.set_desc(first, at, len, IND, 0);
                    self.queues[q].gq.push_avail(first);
                }
                ChainSpec::DirectThenIndirect(d, ind) => {
                    let Some((at, ilen)) = self.indirect_table(q, ind) else {
                        continue;
                    };
                    let first = self.queues[q].gq.alloc(need as u16);
                    for (i, s) in d.iter().enumerate() {
                        let (addr, len) =
                            self.place(s.addr.resolve(), s.len.resolve(fit(&s.content)), s.write);
                        self.fill(addr, len, &s.content);
                        let flags = if s.write { WRITE } else { 0 } | NEXT;
                        self.queues[q].gq.set_desc(
                            first + i as u16,
                            addr,
                            len,
                            flags,
                            first + i as u16 + 1,
                        );
                    }
                    self.queues[q]
                        .gq
                        .set_desc(first + d.len() as u16, at, ilen, IND, 0);
                    self.queues[q].gq.push_avail(first);
                }
                ChainSpec::Raw(d) => {
                    let first = self.queues[q].gq.alloc(need as u16);
                    for (i, s) in d.iter().enumerate() {
                        let mut len = s.len.resolve(fit(&s.content));
                        let mut addr = s.addr.resolve();
                        if s.flags & IND != 0 && !self.chaos {
                            // Indirect tables only where the driver wrote
                            // descriptors (whole ones), so that every
                            // descriptor the device can meet was placed.
                            let slot = self.queues[q].slot;
                            addr = slot + INDIRECT + (addr % (SLOT - INDIRECT)) / 16 * 16;
                            len = len.min((slot + SLOT - addr) as u32);
                        } else {
                            (addr, len) = self.place(addr, len, s.flags & WRITE != 0);
                            self.fill(addr, len, &s.content);
                        }
                        self.queues[q]
                            .gq
                            .set_desc(first + i as u16, addr, len, s.flags, s.next);
                    }
                    if d.is_empty() {
                        self.queues[q].gq.set_desc(first, DATA0, 0, 0, 0);
                    }
                    self.queues[q].gq.push_avail(first);
                }
            }
        }
        if let Some(skew) = b.avail_skew {
            let gq = &self.queues[q].gq;
            gq.set_avail_idx(gq.avail_idx().wrapping_add(skew));
        }
        (q, self.oracle(q))
    }

    /// Walks what the device will pop from queue `q` (advancing the
    /// shadow queue as the device will advance its own).
    pub fn oracle(&mut self, q: usize) -> Submitted<'m> {
        let mem: &'m GuestMemoryMmap = self.mem;
        let shadow = &mut self.queues[q].shadow;
        let Ok(iter) = shadow.iter(mem) else {
            return Submitted::Corrupt;
        };
        let out = iter
            .map(|chain| {
                let descs: Vec<(u64, u32, bool)> = chain
                    .clone()
                    .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                    .collect();
                let writable_bytes = descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
                let info = ChainInfo {
                    head: chain.head_index(),
                    descs,
                    writable_bytes,
                };
                Walked { info, chain }
            })
            .collect();
        Submitted::Chains(out)
    }

    /// The used entries the device added to queue `q` since `from`.
    pub fn used_since(&self, q: usize, from: u16) -> Vec<(u32, u32)> {
        let gq = &self.queues[q].gq;
        let to = gq.used_idx();
        let n = to.wrapping_sub(from);
        assert!(
            n <= gq.size,
            "queue {q}: used index moved by {n}, more than the queue size {}",
            gq.size
        );
        (0..n).map(|i| gq.used(from.wrapping_add(i))).collect()
    }

    /// The generic check after a kick: the device returned exactly the
    /// `expected` heads, in order, each with a used length within its
    /// bound (the chain's writable bytes, when known).
    pub fn check_used(
        &self,
        q: usize,
        used_before: u16,
        expected: &[(u16, Option<u64>)],
    ) -> Vec<(u32, u32)> {
        let used = self.used_since(q, used_before);
        let heads: Vec<u32> = used.iter().map(|u| u.0).collect();
        let want: Vec<u32> = expected.iter().map(|e| u32::from(e.0)).collect();
        assert_eq!(
            heads, want,
            "queue {q}: used heads differ from the chains made available"
        );
        for (&(head, len), &(_, bound)) in used.iter().zip(expected) {
            if let Some(bound) = bound {
                assert!(
                    u64::from(len) <= bound,
                    "queue {q}: chain {head}: used length {len} exceeds its {bound} writable bytes"
                );
            }
        }
        used
    }

    /// Allowed changes: writable buffers of `chains`, and the used ring.
    pub fn allowed(&self, q: usize, chains: &[Walked<'_>]) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = chains.iter().flat_map(|c| c.info.writable()).collect();
        v.push(self.queues[q].used_ring_range());
        v
    }
}

/// What a device that returns every chain it pops must put in the used
/// ring: every head inside the queue, with its writable bytes as the bound.
pub fn all_returned(chains: &[Walked<'_>], size: u16) -> Vec<(u16, Option<u64>)> {
    chains
        .iter()
        .filter(|w| w.info.head < size)
        .map(|w| (w.info.head, Some(w.info.writable_bytes)))
        .collect()
}

/// True if `[addr, addr+len)` is entirely guest RAM.
pub fn in_ram(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    usize::try_from(len).is_ok_and(|l| mem.check_range(GuestAddress(addr), l))
}
