//! virtio 1.x over modern virtio-mmio (version 2), from the virtio 1.2
//! spec: the register window, device initialisation (4.2.3.1 / 3.1.1),
//! split virtqueues (2.7) and the DMA arena the rings and buffers live in.
//! Everything runs at CPL3 with volatile accesses to the identity-mapped,
//! uncached MMIO gap; the probe polls used rings and sleeps on the device's
//! IRQ (or a 10 ms PIT one-shot) when it has to wait.

use crate::io;
use crate::time;
use core::cell::Cell;
use core::sync::atomic::{fence, Ordering};

// Register offsets (4.2.2).
const REG_MAGIC: usize = 0x000;
const REG_VERSION: usize = 0x004;
const REG_DEVICE_ID: usize = 0x008;
const REG_DEVICE_FEATURES: usize = 0x010;
const REG_DEVICE_FEATURES_SEL: usize = 0x014;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM_MAX: usize = 0x034;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_INTERRUPT_STATUS: usize = 0x060;
const REG_INTERRUPT_ACK: usize = 0x064;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC_LOW: usize = 0x080;
const REG_QUEUE_DESC_HIGH: usize = 0x084;
const REG_QUEUE_DRIVER_LOW: usize = 0x090;
const REG_QUEUE_DRIVER_HIGH: usize = 0x094;
const REG_QUEUE_DEVICE_LOW: usize = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: usize = 0x0a4;
const REG_CONFIG_GENERATION: usize = 0x0fc;
const REG_CONFIG: usize = 0x100;

const MAGIC: u32 = 0x7472_6976;

// Device status bits (2.1).
const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

/// InterruptStatus: the configuration changed (bit 0: used buffers).
const INT_CONFIG: u32 = 2;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_INDIRECT_DESC (only the hostile `blk-alias` negotiates it).
pub const F_INDIRECT_DESC: u64 = 1 << 28;

// Descriptor flags (2.7.5).
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
pub const DESC_INDIRECT: u16 = 4;
/// used->flags: the device does not need notifications.
const USED_F_NO_NOTIFY: u16 = 1;

/// Device IDs (5).
pub const ID_NET: u32 = 1;
pub const ID_BLOCK: u32 = 2;
pub const ID_RNG: u32 = 4;
pub const ID_BALLOON: u32 = 5;

/// Largest queue the probe uses: the rings of 128 entries fit one page
/// (and `Virtq::in_flight` has a bit for each descriptor).
pub const QUEUE_MAX: u16 = 128;

/// Why a device could not be brought up or stopped working.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// VIRTIO_F_VERSION_1 not offered.
    NoVersion1,
    /// The device cleared FEATURES_OK.
    FeaturesRejected,
    /// A queue the driver needs has QueueNumMax 0 or is already live.
    QueueUnavailable,
    /// The DMA arena is exhausted.
    NoMemory,
    /// A request was not completed in time (the device keeps its buffers,
    /// so the probe stops using it).
    Timeout,
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
}

impl Error {
    pub fn text(self) -> &'static str {
        match self {
            Error::NoVersion1 => "device does not offer VIRTIO_F_VERSION_1",
            Error::FeaturesRejected => "device rejected the features (FEATURES_OK cleared)",
            Error::QueueUnavailable => "queue unavailable (QueueNumMax 0 or already ready)",
            Error::NoMemory => "out of DMA arena memory",
            Error::Timeout => "request timed out",
            Error::NeedsReset => "device needs reset",
        }
    }
}

/// Bump allocator over the DMA arena: RAM right after the probe image
/// (see `ARENA_SIZE` in main.rs), identity-mapped, used by nothing else.
pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    pub const fn new(start: u64, end: u64) -> Arena {
        Arena { next: start, end }
    }

    /// `bytes` of zeroed memory aligned to 4 KiB (guest-physical =
    /// virtual address).
    pub fn alloc(&mut self, bytes: u64) -> Result<u64, Error> {
        let at = self.next.next_multiple_of(4096);
        let end = at.checked_add(bytes).ok_or(Error::NoMemory)?;
        if end > self.end {
            return Err(Error::NoMemory);
        }
        self.next = end;
        // SAFETY: `at..end` is arena RAM (identity-mapped, user-accessible,
        // used by nothing else) that no one has been handed yet.
        unsafe { core::ptr::write_bytes(at as *mut u8, 0, bytes as usize) };
        Ok(at)
    }

    /// Bytes not handed out yet.
    pub fn left(&self) -> u64 {
        self.end.saturating_sub(self.next.next_multiple_of(4096))
    }
}

/// A virtio-mmio register window.
pub struct Mmio {
    base: usize,
    /// A configuration change was seen in InterruptStatus and not yet
    /// handled.
    config_changed: Cell<bool>,
}

impl Mmio {
    /// # Safety
    /// `base` must be a 4 KiB window in the identity-mapped MMIO gap.
    pub const unsafe fn new(base: u64) -> Mmio {
        Mmio {
            base: base as usize,
            config_changed: Cell::new(false),
        }
    }

    fn read(&self, off: usize) -> u32 {
        // SAFETY: `base` is a mapped MMIO window (constructor); registers
        // are 32-bit and aligned.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    fn write(&self, off: usize, v: u32) {
        // SAFETY: as in `read`.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }

    pub fn magic_ok(&self) -> bool {
        self.read(REG_MAGIC) == MAGIC
    }

    pub fn version(&self) -> u32 {
        self.read(REG_VERSION)
    }

    pub fn device_id(&self) -> u32 {
        self.read(REG_DEVICE_ID)
    }

    pub fn config_u8(&self, off: usize) -> u8 {
        // SAFETY: the config space lies in the same mapped window.
        unsafe { ((self.base + REG_CONFIG + off) as *const u8).read_volatile() }
    }

    pub fn config_u32(&self, off: usize) -> u32 {
        self.read(REG_CONFIG + off)
    }

    pub fn write_config_u32(&self, off: usize, v: u32) {
        self.write(REG_CONFIG + off, v);
    }

    /// A 64-bit field read as two 32-bit halves, retried until
    /// ConfigGeneration is stable around it (4.2.2.2).
    pub fn config_u64(&self, off: usize) -> u64 {
        loop {
            let gen = self.read(REG_CONFIG_GENERATION);
            let lo = u64::from(self.config_u32(off));
            let hi = u64::from(self.config_u32(off + 4));
            if self.read(REG_CONFIG_GENERATION) == gen {
                return lo | hi << 32;
            }
        }
    }

    /// Reads and acknowledges InterruptStatus; remembers a config change.
    pub fn ack_interrupt(&self) -> u32 {
        let isr = self.read(REG_INTERRUPT_STATUS);
        if isr != 0 {
            self.write(REG_INTERRUPT_ACK, isr);
            if isr & INT_CONFIG != 0 {
                self.config_changed.set(true);
            }
        }
        isr
    }

    /// Makes the next `take_config_change` true (a driver's first look).
    pub fn note_config_change(&self) {
        self.config_changed.set(true);
    }

    /// Whether a config change was seen since the last call (and forgets it).
    pub fn take_config_change(&self) -> bool {
        self.config_changed.replace(false)
    }

    /// The device asks to be reset (DEVICE_NEEDS_RESET, 64).
    pub fn needs_reset(&self) -> bool {
        self.read(REG_STATUS) & 64 != 0
    }

    /// Writes QueueNotify for queue `index`, whatever its state.
    pub fn notify(&self, index: u16) {
        self.write(REG_QUEUE_NOTIFY, u32::from(index));
    }

    /// Resets the device (status 0) and waits until it reads back 0.
    pub fn reset(&self) {
        self.write(REG_STATUS, 0);
        while self.read(REG_STATUS) != 0 {
            core::hint::spin_loop();
        }
    }

    /// Resets the device and negotiates `wanted & offered` features;
    /// VIRTIO_F_VERSION_1 is required. Returns the negotiated features.
    /// Queues are set up next with `setup_queue`, then `driver_ok`.
    pub fn begin_init(&self, wanted: u64) -> Result<u64, Error> {
        self.reset();
        self.write(REG_STATUS, S_ACKNOWLEDGE);
        self.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write(REG_DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(REG_DEVICE_FEATURES)) << (32 * sel);
        }
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err(Error::NoVersion1);
        }
        let features = offered & (wanted | F_VERSION_1);
        for sel in 0..2u32 {
            self.write(REG_DRIVER_FEATURES_SEL, sel);
            self.write(REG_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let st = S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK;
        self.write(REG_STATUS, st);
        if self.read(REG_STATUS) & S_FEATURES_OK == 0 {
            self.fail();
            return Err(Error::FeaturesRejected);
        }
        Ok(features)
    }

    fn fail(&self) {
        let st = self.read(REG_STATUS);
        self.write(REG_STATUS, st | S_FAILED);
    }

    /// Sets up queue `index` with at most `want` entries (a power of two at
    /// most `QUEUE_MAX`), rings in one fresh arena page.
    pub fn setup_queue(&self, index: u16, want: u16, arena: &mut Arena) -> Result<Virtq, Error> {
        let page = match arena.alloc(4096) {
            Ok(p) => p,
            Err(e) => {
                self.fail();
                return Err(e);
            }
        };
        self.setup_queue_in(index, want, page)
    }

    /// The largest power of two queue size within `want` and queue
    /// `index`'s QueueNumMax (the queue selected); fails (and sets FAILED)
    /// if the queue is unavailable.
    fn queue_size(&self, index: u16, want: u16) -> Result<u16, Error> {
        self.write(REG_QUEUE_SEL, u32::from(index));
        let max = self.read(REG_QUEUE_NUM_MAX);
        if max == 0 || want == 0 || self.read(REG_QUEUE_READY) != 0 {
            self.fail();
            return Err(Error::QueueUnavailable);
        }
        let cap = max.min(u32::from(want));
        Ok(1u16 << (31 - cap.leading_zeros()))
    }

    /// Programs queue `index` (selected by `queue_size`) with `size`
    /// entries and its three rings, and enables it.
    fn program_queue(&self, size: u16, desc: u64, avail: u64, used: u64) {
        self.write(REG_QUEUE_NUM, u32::from(size));
        for (lo, hi, addr) in [
            (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, desc),
            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, avail),
            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, used),
        ] {
            self.write(lo, addr as u32);
            self.write(hi, (addr >> 32) as u32);
        }
        self.write(REG_QUEUE_READY, 1);
    }

    /// Sets up queue `index` with up to `want` entries (a power of two)
    /// whose rings the caller placed: descriptors at `desc` (16 bytes an
    /// entry), the available ring at `avail`, the used ring at `used`, all
    /// zeroed and large enough for `want` entries. Returns the size chosen.
    pub fn setup_raw_queue(
        &self,
        index: u16,
        want: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> Result<u16, Error> {
        let size = self.queue_size(index, want)?;
        self.program_queue(size, desc, avail, used);
        Ok(size)
    }

    /// Sets up queue `index` as `setup_queue` does, in the given ring page
    /// (4 KiB of arena RAM owned by this queue; zeroed here).
    pub fn setup_queue_in(&self, index: u16, want: u16, page: u64) -> Result<Virtq, Error> {
        let size = self.queue_size(index, want.min(QUEUE_MAX))?;
        // SAFETY: the caller hands over the ring page, which nothing else
        // uses; the device does not know it yet (the queue is not ready).
        unsafe { core::ptr::write_bytes(page as *mut u8, 0, 4096) };
        let n = u64::from(size);
        let desc = page;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        self.program_queue(size, desc, avail, used);
        let mut q = Virtq {
            index,
            size,
            desc,
            avail,
            used,
            notify: self.base + REG_QUEUE_NOTIFY,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
            in_flight: 0,
            bogus: 0,
        };
        for i in 0..size {
            q.set_next(i, (i + 1) % size);
        }
        Ok(q)
    }

    /// Sets DRIVER_OK: the device is live.
    pub fn driver_ok(&self) {
        self.write(
            REG_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }
}

/// A split virtqueue (2.7) whose three rings share one 4 KiB page:
/// descriptors at 0, the available ring after them, the used ring after
/// that (4-aligned). Descriptors not in use form a free list through `next`.
pub struct Virtq {
    index: u16,
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: usize,
    free_head: u16,
    num_free: u16,
    /// Next available-ring slot (free-running, as avail->idx).
    avail_idx: u16,
    /// Next used-ring entry to consume (free-running).
    last_used: u16,
    /// Heads of the chains the device holds (bit per descriptor).
    in_flight: u128,
    /// Used entries whose id was no chain the device held (ignored).
    pub bogus: u32,
}

impl Virtq {
    fn desc_ptr(&self, i: u16) -> *mut u8 {
        (self.desc + 16 * u64::from(i % self.size)) as *mut u8
    }

    fn set_next(&mut self, i: u16, next: u16) {
        // SAFETY: descriptor `i` lies in this queue's ring page (arena RAM
        // owned by this queue); `next` is at offset 14.
        unsafe { self.desc_ptr(i).add(14).cast::<u16>().write_volatile(next) }
    }

    fn next_of(&self, i: u16) -> u16 {
        // SAFETY: as in `set_next`.
        unsafe { self.desc_ptr(i).add(14).cast::<u16>().read_volatile() }
    }

    fn flags_of(&self, i: u16) -> u16 {
        // SAFETY: as in `set_next`; flags are at offset 12.
        unsafe { self.desc_ptr(i).add(12).cast::<u16>().read_volatile() }
    }

    /// The ring page (see `Mmio::setup_queue_in`).
    pub fn page(&self) -> u64 {
        self.desc
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// The descriptor the next one-descriptor `push` will use, if any is
    /// free (lets a driver tie buffer `d` to descriptor `d`).
    pub fn next_free(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Makes `bufs` (address, length, device-writable) one chain and puts
    /// it on the available ring (without notifying). Returns the head
    /// descriptor, or None if there are not enough free descriptors.
    pub fn push(&mut self, bufs: &[(u64, u32, bool)]) -> Option<u16> {
        let n = u16::try_from(bufs.len()).ok()?;
        if n == 0 || n > self.num_free {
            return None;
        }
        let head = self.free_head;
        let mut d = head;
        for (k, &(addr, len, writable)) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let next = self.next_of(d);
            let flags = if writable { DESC_WRITE } else { 0 } | if last { 0 } else { DESC_NEXT };
            let p = self.desc_ptr(d);
            // SAFETY: descriptor `d` is free (taken from the free list) and
            // lies in this queue's ring page: addr at 0, len at 8, flags at
            // 12; `next` (offset 14) already links to the following free
            // descriptor, which becomes the chain's next.
            unsafe {
                p.cast::<u64>().write_volatile(addr);
                p.add(8).cast::<u32>().write_volatile(len);
                p.add(12).cast::<u16>().write_volatile(flags);
            }
            if last {
                self.free_head = next;
            } else {
                d = next;
            }
        }
        self.num_free -= n;
        self.in_flight |= 1 << head;
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        // SAFETY: the avail ring lies in this queue's page: flags at 0, idx
        // at 2, ring[size] from 4. The fence orders the descriptor and ring
        // writes before the index the device reads (2.7.13).
        unsafe {
            (slot as *mut u16).write_volatile(head);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            fence(Ordering::SeqCst);
            ((self.avail + 2) as *mut u16).write_volatile(self.avail_idx);
        }
        Some(head)
    }

    /// Tells the device about new available buffers unless it said it does
    /// not need to know (used->flags NO_NOTIFY).
    pub fn kick(&self) {
        fence(Ordering::SeqCst);
        // SAFETY: used->flags is the first u16 of the used ring (our page).
        let flags = unsafe { (self.used as *const u16).read_volatile() };
        if flags & USED_F_NO_NOTIFY == 0 {
            // SAFETY: QueueNotify of the mapped window this queue belongs to.
            unsafe { (self.notify as *mut u32).write_volatile(u32::from(self.index)) }
        }
    }

    /// Whether the device has used buffers the driver has not consumed.
    pub fn has_used(&self) -> bool {
        // SAFETY: used->idx is at offset 2 of the used ring (our page).
        let idx = unsafe { ((self.used + 2) as *const u16).read_volatile() };
        idx != self.last_used
    }

    /// Consumes the next used entry: returns (head, written length) and
    /// puts the chain back on the free list. An entry whose id is no chain
    /// the device holds is skipped (and counted in `bogus`): a broken device
    /// must not corrupt the free list.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        loop {
            if !self.has_used() {
                return None;
            }
            fence(Ordering::Acquire);
            let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            // SAFETY: used->ring[size] of {u32 id, u32 len} from offset 4
            // (our page); the entry is complete once used->idx covers it.
            let (id, len) = unsafe {
                (
                    (e as *const u32).read_volatile(),
                    ((e + 4) as *const u32).read_volatile(),
                )
            };
            self.last_used = self.last_used.wrapping_add(1);
            match usize::try_from(id) {
                Ok(i) if i < usize::from(self.size) && self.in_flight & 1 << i != 0 => {
                    self.in_flight &= !(1 << i);
                    self.free_chain(i as u16);
                    return Some((i as u16, len));
                }
                _ => self.bogus = self.bogus.saturating_add(1),
            }
        }
    }

    /// Returns the chain at `head` to the free list.
    fn free_chain(&mut self, head: u16) {
        let mut d = head;
        let mut n = 1;
        while self.flags_of(d) & DESC_NEXT != 0 && n < self.size {
            d = self.next_of(d) % self.size;
            n += 1;
        }
        self.set_next(d, self.free_head);
        self.free_head = head;
        self.num_free = (self.num_free + n).min(self.size);
    }
}

/// Waits until `done()` holds: spins briefly, then acknowledges the device's
/// interrupt, re-checks and sleeps until an IRQ (the device's, or the 10 ms
/// PIT one-shot armed before each sleep). Gives up after `timeout_s`.
pub fn wait(mmio: &Mmio, timeout_s: u64, mut done: impl FnMut() -> bool) -> Result<(), Error> {
    let hz = time::timeout_hz();
    let start = time::rdtsc();
    let spin = hz / 50_000; // 20 us
    loop {
        if done() {
            return Ok(());
        }
        let elapsed = time::rdtsc().wrapping_sub(start);
        if elapsed > timeout_s * hz {
            return Err(if mmio.needs_reset() {
                Error::NeedsReset
            } else {
                Error::Timeout
            });
        }
        if elapsed < spin || !io::irqs_ready() {
            core::hint::spin_loop();
            continue;
        }
        if mmio.ack_interrupt() & INT_CONFIG != 0 && mmio.needs_reset() {
            return Err(Error::NeedsReset);
        }
        if done() {
            return Ok(());
        }
        time::arm_wakeup();
        io::idle();
    }
}
