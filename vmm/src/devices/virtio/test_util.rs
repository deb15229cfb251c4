//! Test scaffolding: guest memory, a driver-side view of split queues built
//! on virtio-queue's mock, and a harness that brings a device up through its
//! MMIO registers exactly as a Linux driver does.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::VirtioDevice;
use super::interrupt::Interrupt;
use super::mmio::*;
use super::net::NetBackend;
use crate::arch::x86_64::layout::fit_u16;
use crate::devices::bus::BusDevice;

pub const MEM_SIZE: usize = 16 << 20;
/// Where test data buffers start (queues live below).
pub const DATA: u64 = 0x10_0000;

/// Descriptor flags as the table holds them (virtio-bindings has them as u32).
const NEXT: u16 = fit_u16(VRING_DESC_F_NEXT as u64);
const WRITE: u16 = fit_u16(VRING_DESC_F_WRITE as u64);
const INDIRECT: u16 = fit_u16(virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u64);

/// `n` as a u32: a length, index or register value in a test, which fits.
pub fn u32_of<T: TryInto<u32>>(n: T) -> u32
where
    T::Error: std::fmt::Debug,
{
    n.try_into().expect("fits in 32 bits")
}

/// `n` as a u16: a descriptor count or index in a test, which fits.
pub fn u16_of<T: TryInto<u16>>(n: T) -> u16
where
    T::Error: std::fmt::Debug,
{
    n.try_into().expect("fits in 16 bits")
}

pub fn guest_mem() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap())
}

/// One buffer of a chain, as the driver describes it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Device-readable buffer.
pub fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

/// Device-writable buffer.
pub fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// A split queue as the driver sees it. Descriptors and the available ring
/// come from virtio-queue's `MockSplitQueue`; the used ring is placed
/// 32 KiB above the table rather than where the mock puts it, because the
/// mock computes its used ring address from the available ring's entry count
/// instead of its byte size, and the two rings would overlap after size/2
/// requests.
pub struct GuestQueue<'a> {
    pub mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    pub size: u16,
    pub used_addr: GuestAddress,
    next_desc: u16,
}

// By hand: the mock is not Debug.
impl std::fmt::Debug for GuestQueue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestQueue")
            .field("desc_table", &self.mock.desc_table_addr())
            .field("avail", &self.mock.avail_addr())
            .field("used", &self.used_addr)
            .field("size", &self.size)
            .field("next_desc", &self.next_desc)
            .finish_non_exhaustive()
    }
}

impl<'a> GuestQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
        let used_addr = GuestAddress(base + 0x8000);
        mem.write_slice(&vec![0u8; 8 + 8 * usize::from(size)], used_addr)
            .unwrap();
        Self {
            mock,
            mem,
            size,
            used_addr,
            next_desc: 0,
        }
    }

    /// Adds a chain made of `descs` and makes it available; returns its head.
    pub fn add(&mut self, descs: &[Desc]) -> u16 {
        let first = self.alloc(u16_of(descs.len()));
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                let mut flags = if d.write { WRITE } else { 0 };
                if !last {
                    flags |= NEXT;
                }
                let next = if last { 0 } else { first + u16_of(i) + 1 };
                RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next))
            })
            .collect();
        // Not `MockSplitQueue::add_desc_chains`: it indexes the available
        // ring without wrapping at the queue size.
        for (i, d) in raw.into_iter().enumerate() {
            self.mock.desc_table().store(first + u16_of(i), d).unwrap();
        }
        self.push_avail(first);
        first
    }

    /// Reserves `n` consecutive descriptor slots; returns the first.
    pub fn alloc(&mut self, n: u16) -> u16 {
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        self.next_desc += n;
        first
    }

    /// Writes a raw descriptor (for chains a well-behaved driver never builds).
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.mock.desc_table().store(index, raw).unwrap();
    }

    /// Puts `head` in the available ring, whatever it is.
    pub fn push_avail(&self, head: u16) {
        let idx = self.avail_idx();
        let pos = self
            .mock
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(idx % self.size));
        self.mem.write_obj(head, pos).unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    pub fn avail_idx(&self) -> u16 {
        self.mem
            .read_obj(self.mock.avail_addr().unchecked_add(2))
            .unwrap()
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, self.mock.avail_addr().unchecked_add(2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used_addr.unchecked_add(2)).unwrap()
    }

    /// The used ring entry at position `i`: (head, bytes written).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self
            .used_addr
            .unchecked_add(4 + 8 * u64::from(i % self.size));
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        (id, len)
    }

    /// The most recent used entry.
    pub fn last_used(&self) -> (u32, u32) {
        self.used(self.used_idx().wrapping_sub(1))
    }
}

/// A device behind its MMIO transport, with the irqfd and notification
/// EventFds the test can observe.
#[derive(Debug)]
pub struct Harness {
    pub mem: Arc<GuestMemoryMmap>,
    pub transport: MmioTransport,
    irq: EventFd,
}

impl Harness {
    pub fn new<D: VirtioDevice + 'static>(device: D) -> Self {
        Self::with_mem(device, guest_mem())
    }

    pub fn with_mem<D: VirtioDevice + 'static>(device: D, mem: Arc<GuestMemoryMmap>) -> Self {
        let evts: Vec<EventFd> = device
            .queue_max_sizes()
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let irq_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = irq_evt.try_clone().unwrap();
        let transport =
            MmioTransport::new(Box::new(device), mem.clone(), Interrupt::new(irq_evt), evts)
                .unwrap();
        Self {
            mem,
            transport,
            irq,
        }
    }

    pub fn read32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write32(&mut self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    pub fn config(&mut self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.transport.read(REG_CONFIG + off, &mut b);
        b
    }

    pub fn device_features(&mut self) -> u64 {
        self.write32(REG_DEVICE_FEATURES_SEL, 0);
        let lo = self.read32(REG_DEVICE_FEATURES);
        self.write32(REG_DEVICE_FEATURES_SEL, 1);
        let hi = self.read32(REG_DEVICE_FEATURES);
        u64::from(hi) << 32 | u64::from(lo)
    }

    /// Negotiates `features` and stops after FEATURES_OK; returns the status.
    pub fn negotiate(&mut self, features: u64) -> u32 {
        self.write32(REG_STATUS, 0);
        self.write32(REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write32(
            REG_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.write32(REG_DRIVER_FEATURES_SEL, 0);
        self.write32(REG_DRIVER_FEATURES, (features & 0xffff_ffff) as u32);
        self.write32(REG_DRIVER_FEATURES_SEL, 1);
        self.write32(REG_DRIVER_FEATURES, (features >> 32) as u32);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write32(REG_STATUS, s);
        self.read32(REG_STATUS)
    }

    /// Points queue `index` at `q` and enables it.
    pub fn setup_queue(&mut self, index: u32, q: &GuestQueue<'_>) {
        self.write32(REG_QUEUE_SEL, index);
        self.write32(REG_QUEUE_NUM, u32::from(q.size));
        let set = |h: &mut Self, lo: u64, a: GuestAddress| {
            h.write32(lo, (a.0 & 0xffff_ffff) as u32);
            h.write32(lo + 4, (a.0 >> 32) as u32);
        };
        set(self, REG_QUEUE_DESC_LOW, q.mock.desc_table_addr());
        set(self, REG_QUEUE_DRIVER_LOW, q.mock.avail_addr());
        set(self, REG_QUEUE_DEVICE_LOW, q.used_addr);
        self.write32(REG_QUEUE_READY, 1);
    }

    pub fn driver_ok(&mut self) -> u32 {
        let s = self.read32(REG_STATUS);
        self.write32(REG_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        self.read32(REG_STATUS)
    }

    /// The whole bring-up: negotiate `VERSION_1 | extra`, set up `queues`
    /// (queue i gets `queues[i]`), DRIVER_OK. Panics if the device refuses.
    pub fn activate(&mut self, extra: u64, queues: &[&GuestQueue<'_>]) {
        let s = self.negotiate(1 << VIRTIO_F_VERSION_1 | extra);
        assert_ne!(s & VIRTIO_CONFIG_S_FEATURES_OK, 0, "features refused");
        for (i, q) in queues.iter().enumerate() {
            self.setup_queue(u32_of(i), q);
        }
        let s = self.driver_ok();
        assert_eq!(s & 0x40, 0, "device needs reset after DRIVER_OK");
        assert!(self.transport.is_active());
    }

    /// Runs the device on queue `index`, as the event loop would, and
    /// waits for what it runs asynchronously (a disk's I/O thread).
    pub fn kick(&mut self, index: usize) {
        self.transport.process_queue(index);
        self.transport.drain_io();
    }

    /// Interrupts raised since the last call.
    pub fn take_irq(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }
}

/// A virtio-net backend on one end of a SOCK_SEQPACKET pair (frame
/// boundaries survive, as on a TAP fd); the test holds the other end.
#[derive(Debug)]
pub struct SockBackend {
    pub file: File,
    /// Every TUN_F_* set the device asked for, in order.
    pub offloads: Arc<Mutex<Vec<u32>>>,
}

impl NetBackend for SockBackend {
    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

/// A non-blocking SOCK_SEQPACKET socket pair.
pub fn socketpair() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array we pass.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    }
}

/// Waits up to `ms` for `fd` to become readable.
pub fn wait_readable(fd: RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

/// An address far outside guest memory.
pub const FAR: u64 = 0xffff_0000_0000;
/// Scratch area for indirect tables built by the battery.
const IND: u64 = DATA + 0x80_0000;

type RawChain = Vec<(u64, u32, u16, u16)>;

/// Chains no well-behaved driver builds. Each entry gets the index of its
/// first descriptor and the queue size, and returns (addr, len, flags, next).
#[allow(clippy::type_complexity)]
fn hostile_chains() -> Vec<(&'static str, fn(u16, u16) -> RawChain)> {
    vec![
        ("readable self-loop", |f, _| vec![(DATA, 64, NEXT, f)]),
        ("writable self-loop", |f, _| {
            vec![(DATA, 64, NEXT | WRITE, f)]
        }),
        ("two-descriptor loop", |f, _| {
            vec![(DATA, 512, NEXT, f + 1), (DATA + 512, 512, NEXT | WRITE, f)]
        }),
        ("next index past the table", |_, s| {
            vec![(DATA, 64, NEXT, s + 5)]
        }),
        ("readable buffer outside memory", |f, _| {
            vec![(FAR, 512, NEXT, f + 1), (DATA, 16, WRITE, 0)]
        }),
        ("writable buffer outside memory", |f, _| {
            vec![(DATA, 16, NEXT, f + 1), (FAR, 512, WRITE, 0)]
        }),
        ("readable buffer across the end of memory", |f, _| {
            vec![
                (MEM_SIZE as u64 - 8, 4096, NEXT, f + 1),
                (DATA, 16, WRITE, 0),
            ]
        }),
        ("writable buffer across the end of memory", |f, _| {
            vec![
                (DATA, 16, NEXT, f + 1),
                (MEM_SIZE as u64 - 8, 4096, WRITE, 0),
            ]
        }),
        ("address overflow", |f, _| {
            vec![
                (u64::MAX - 8, 64, NEXT, f + 1),
                (u64::MAX - 8, 64, WRITE, 0),
            ]
        }),
        ("zero-length buffers", |f, _| {
            vec![(DATA, 0, NEXT, f + 1), (DATA, 0, WRITE, 0)]
        }),
        ("only readable buffers", |f, _| {
            vec![(DATA, 16, NEXT, f + 1), (DATA + 16, 16, 0, 0)]
        }),
        ("only writable buffers", |f, _| {
            vec![(DATA, 16, WRITE | NEXT, f + 1), (DATA + 16, 16, WRITE, 0)]
        }),
        ("writable before readable", |f, _| {
            vec![(DATA, 16, WRITE | NEXT, f + 1), (DATA + 16, 16, 0, 0)]
        }),
        ("4 GiB buffers", |f, _| {
            vec![(DATA, u32::MAX, NEXT, f + 1), (DATA, u32::MAX, WRITE, 0)]
        }),
        ("more than 4 GiB in one chain", |f, _| {
            vec![
                (DATA, 0x8000_0000, NEXT, f + 1),
                (DATA, 0x8000_0000, NEXT, f + 2),
                (DATA, 0x8000_0000, WRITE, 0),
            ]
        }),
        ("indirect table of odd length", |_, _| {
            vec![(IND, 15, INDIRECT, 0)]
        }),
        ("indirect table outside memory", |_, _| {
            vec![(FAR, 64, INDIRECT, 0)]
        }),
        ("indirect table that loops", |_, _| {
            vec![(IND, 32, INDIRECT, 0)]
        }),
        ("nested indirect table", |_, _| {
            vec![(IND + 0x100, 16, INDIRECT, 0)]
        }),
        ("indirect after a direct descriptor", |f, _| {
            vec![(DATA, 16, NEXT, f + 1), (IND, 32, INDIRECT, 0)]
        }),
    ]
}

/// Feeds the device every chain in [`hostile_chains`], a head index past the
/// queue, and finally a corrupt available index. After each bad chain the
/// device must still be active and pass `check` (a well-formed request); the
/// corrupt ring must leave it stopped with DEVICE_NEEDS_RESET, not spinning.
/// `kick` makes the device look at queue `q` (for RX it first gives the
/// device a frame to deliver).
pub fn hostile_battery(
    h: &mut Harness,
    q: &mut GuestQueue<'_>,
    kick: &mut dyn FnMut(&mut Harness),
    check: &mut dyn FnMut(&mut Harness, &mut GuestQueue<'_>),
) {
    let mem = h.mem.clone();
    // The looping indirect table (two entries: 0 -> 1 -> 0) and the nested one.
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    };
    mem.write_obj(desc(DATA, 64, NEXT | WRITE, 1), GuestAddress(IND))
        .unwrap();
    mem.write_obj(desc(DATA, 64, NEXT, 0), GuestAddress(IND + 16))
        .unwrap();
    mem.write_obj(
        desc(IND + 0x100, 16, INDIRECT, 0),
        GuestAddress(IND + 0x100),
    )
    .unwrap();

    for (name, build) in hostile_chains() {
        eprintln!("hostile chain: {name}");
        let chain = build(0, q.size);
        let first = q.alloc(u16_of(chain.len()));
        for (i, (addr, len, flags, next)) in build(first, q.size).into_iter().enumerate() {
            q.set_desc(first + u16_of(i), addr, len, flags, next);
        }
        q.push_avail(first);
        kick(h);
        assert!(h.transport.is_active(), "{name}: device stopped");
        check(h, q);
    }

    q.push_avail(q.size + 7);
    kick(h);
    assert!(
        h.transport.is_active(),
        "head past the queue: device stopped"
    );
    check(h, q);

    // An available index a whole queue ahead of the device: the ring is
    // corrupt and the device must stop rather than spin or re-serve chains.
    let used_before = q.used_idx();
    q.set_avail_idx(q.avail_idx().wrapping_add(q.size + 1));
    kick(h);
    assert!(
        !h.transport.is_active(),
        "corrupt avail idx: device still active"
    );
    assert_ne!(h.read32(REG_STATUS) & 0x40, 0, "DEVICE_NEEDS_RESET not set");
    assert_eq!(
        q.used_idx(),
        used_before,
        "chains served from a corrupt ring"
    );
    kick(h);
    assert_eq!(q.used_idx(), used_before);
}

/// A directory under the system temp dir, removed with its contents on drop
/// (a few lines instead of pulling the tempfile crate into the build).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ksmvm-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
