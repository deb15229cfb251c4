//! virtio-blk: request chains of any shape against a 64 KiB in-memory
//! image (a memfd), served by the real device behind its MMIO transport.
//!
//! Checks (besides no panic and no access outside guest memory, which
//! vm-memory turns into errors): every chain comes back in order with a
//! used length within its writable bytes; the status byte is a valid
//! VIRTIO_BLK_S_*; nothing outside the writable buffers and the used ring
//! changes; a corrupt ring stops the device; a well-formed write and
//! read-back succeed afterwards, before and after a reset.

#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use ksmvm::devices::virtio::test_util::{r, w, Harness};
use ksmvm::config::devices::Rate;
use ksmvm::devices::virtio::{Block, DiskConfig};
use ksmvm_fuzz::*;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};

const DISK_BYTES: u64 = 64 * 1024;
const CAPACITY: u64 = DISK_BYTES / 512;

#[derive(Arbitrary, Debug, Clone)]
enum BlkType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

impl BlkType {
    fn value(&self) -> u32 {
        match self {
            BlkType::In => VIRTIO_BLK_T_IN,
            BlkType::Out => VIRTIO_BLK_T_OUT,
            BlkType::Flush => VIRTIO_BLK_T_FLUSH,
            BlkType::GetId => VIRTIO_BLK_T_GET_ID,
            BlkType::Discard => VIRTIO_BLK_T_DISCARD,
            BlkType::WriteZeroes => VIRTIO_BLK_T_WRITE_ZEROES,
            BlkType::Other(v) => *v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Sector {
    Inside(u8),
    /// Around the end of the image.
    End(u8),
    Raw(u64),
}

impl Sector {
    fn value(&self) -> u64 {
        match self {
            Sector::Inside(s) => u64::from(*s) % CAPACITY,
            Sector::End(s) => (CAPACITY + 4).wrapping_sub(u64::from(*s) % 8),
            Sector::Raw(s) => *s,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
struct Segment {
    sector: Sector,
    sectors: u32,
    small: bool,
    flags: u32,
}

#[derive(Arbitrary, Debug, Clone)]
enum BlkContent {
    Header {
        ty: BlkType,
        sector: Sector,
    },
    Segments(Vec<Segment>),
    /// A header followed by its payload in one buffer: discard or
    /// write-zeroes segments, or OUT data.
    Request {
        ty: BlkType,
        sector: Sector,
        segments: Vec<Segment>,
        data_sectors: u8,
    },
    Bytes(Vec<u8>),
}

fn segment_bytes(s: &[Segment]) -> Vec<u8> {
    s.iter()
        .flat_map(|g| {
            let n = if g.small { g.sectors % 64 } else { g.sectors };
            let mut b = g.sector.value().to_le_bytes().to_vec();
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&(g.flags & 3).to_le_bytes());
            b
        })
        .collect()
}

fn header_bytes(ty: &BlkType, sector: &Sector) -> Vec<u8> {
    let mut b = ty.value().to_le_bytes().to_vec();
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&sector.value().to_le_bytes());
    b
}

impl Content for BlkContent {
    fn bytes(&self) -> Vec<u8> {
        match self {
            BlkContent::Header { ty, sector } => header_bytes(ty, sector),
            BlkContent::Segments(s) => segment_bytes(s),
            BlkContent::Request {
                ty,
                sector,
                segments,
                data_sectors,
            } => {
                let mut b = header_bytes(ty, sector);
                b.extend(segment_bytes(segments));
                b.resize(b.len() + 512 * usize::from(data_sectors % 9), 0xd7);
                b
            }
            BlkContent::Bytes(b) => b.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    features: u64,
    queue_size: u8,
    chaos: bool,
    batches: Vec<Batch<BlkContent>>,
}

/// The image: one memfd per process, emptied for every input, opened by
/// the device through /proc/self/fd like any image path.
fn disk() -> &'static (OwnedFd, PathBuf) {
    static DISK: OnceLock<(OwnedFd, PathBuf)> = OnceLock::new();
    DISK.get_or_init(|| {
        // SAFETY: a NUL-terminated name; the fd is checked and owned below.
        let fd = unsafe { libc::memfd_create(c"ksmvm-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        (fd, path)
    })
}

fn reset_disk() {
    let fd = disk().0.as_raw_fd();
    // SAFETY: ftruncate on our own memfd.
    unsafe {
        assert_eq!(libc::ftruncate(fd, 0), 0);
        assert_eq!(libc::ftruncate(fd, DISK_BYTES as i64), 0);
    }
}

fn disk_read(offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(&disk().1).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

/// The last byte of the chain's last non-empty writable buffer: where the
/// device puts the status.
fn status_byte(info: &ChainInfo) -> Option<u64> {
    info.writable()
        .filter(|&(_, l)| l > 0)
        .last()
        .map(|(a, l)| a.wrapping_add(l - 1))
}

const HDR: u64 = DATA1 + 0x3_0000;
const BUF: u64 = DATA1 + 0x3_1000;
const STATUS: u64 = DATA1 + 0x3_2000;

fn header(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Runs one two-descriptor request (every queue size holds it) and
/// returns its used length.
fn request(d: &mut Driver<'_>, descs: [ksmvm::devices::virtio::test_util::Desc; 2]) -> u32 {
    let gq = &mut d.queues[0].gq;
    let size = gq.size;
    gq.alloc(size);
    let before = gq.used_idx();
    let head = gq.add(&descs);
    d.h.kick(0);
    let gq = &d.queues[0].gq;
    assert!(
        d.h.transport.is_active(),
        "device stopped on a well-formed request"
    );
    assert_eq!(
        gq.used_idx(),
        before.wrapping_add(1),
        "well-formed request not returned"
    );
    let (id, len) = gq.last_used();
    assert_eq!(id, u32::from(head));
    len
}

/// A well-formed write (header and data in one buffer) and read (data and
/// status in one buffer) of two sectors.
fn well_formed(d: &mut Driver<'_>, ro: bool, round: u8) {
    let sector = 5 + u64::from(round % 100);
    let data: Vec<u8> = (0..1024u32).map(|i| (i as u8) ^ round ^ 0x5a).collect();
    let mut out = header(VIRTIO_BLK_T_OUT, sector).to_vec();
    out.extend_from_slice(&data);
    d.mem.write_slice(&out, GuestAddress(HDR)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let len = request(d, [r(HDR, out.len() as u32), w(STATUS, 1)]);
    assert_eq!(len, 1);
    let st: u8 = d.mem.read_obj(GuestAddress(STATUS)).unwrap();
    let want = if ro {
        VIRTIO_BLK_S_IOERR
    } else {
        VIRTIO_BLK_S_OK
    };
    assert_eq!(u32::from(st), want, "well-formed write answered {st}");
    if !ro {
        assert_eq!(
            disk_read(sector * 512, 1024),
            data,
            "write did not reach the image"
        );
    }

    d.mem
        .write_slice(&header(VIRTIO_BLK_T_IN, sector), GuestAddress(HDR))
        .unwrap();
    d.mem
        .write_slice(&[0xeeu8; 1025], GuestAddress(BUF))
        .unwrap();
    let len = request(d, [r(HDR, 16), w(BUF, 1025)]);
    assert_eq!(len, 1025);
    let mut got = vec![0u8; 1025];
    d.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(
        u32::from(got[1024]),
        VIRTIO_BLK_S_OK,
        "well-formed read failed"
    );
    assert_eq!(&got[..1024], disk_read(sector * 512, 1024).as_slice());
}

fuzz_target!(|input: Input| {
    reset_disk();
    let cfg = DiskConfig {
        read_only: input.read_only,
        id: Some("fuzz-disk".to_string().try_into().unwrap()),
        // Unlimited: the oracle expects every chain served in one kick.
        bw: Some(Rate(0)),
        iops: Some(Rate(0)),
        ..DiskConfig::new(disk().1.clone())
    };
    let mem = guest_memory();
    let block = Block::new(&cfg, &mem).expect("open the memfd image");
    assert_eq!(block.capacity_sectors(), CAPACITY);
    let counters = block.counters();
    let h = Harness::with_mem(block, mem.clone());
    let size = queue_size(input.queue_size, 256);
    let mut d = Driver::new(h, &mem, input.features, &[size], input.chaos);

    for batch in input.batches.iter().take(16) {
        let (q, sub) = d.submit(batch);
        let used_before = d.queues[q].gq.used_idx();
        let requests_before = counters.requests.load(Ordering::Relaxed);
        let snap = (!d.chaos).then(|| Snapshot::take(&mem));
        d.h.kick(q);
        if d.chaos {
            if !d.is_active() {
                d.reset_and_reactivate();
            }
            continue;
        }
        let chains = match sub {
            Submitted::Corrupt => {
                assert!(
                    !d.is_active() && d.needs_reset(),
                    "corrupt ring: device still active"
                );
                assert!(
                    d.used_since(q, used_before).is_empty(),
                    "served a corrupt ring"
                );
                d.reset_and_reactivate();
                continue;
            }
            Submitted::Chains(c) => c,
        };
        assert!(d.is_active(), "device stopped without a corrupt ring");
        assert_eq!(
            counters.requests.load(Ordering::Relaxed) - requests_before,
            chains.len() as u64,
            "requests served != chains made available"
        );
        let used = d.check_used(q, used_before, &all_returned(&chains, size));
        let returned: Vec<&Walked<'_>> = chains.iter().filter(|c| c.info.head < size).collect();
        for (i, (c, &(_, len))) in returned.iter().zip(&used).enumerate() {
            if len == 0 {
                continue;
            }
            let at = status_byte(&c.info).expect("used length > 0 without a writable byte");
            // A later chain may have written over it.
            let later = &returned[i + 1..];
            if later
                .iter()
                .any(|l| l.info.writable().any(|(a, n)| overlaps(at, 1, a, n)))
            {
                continue;
            }
            let st: u8 = mem
                .read_obj(GuestAddress(at))
                .expect("status byte outside guest memory");
            assert!(
                u32::from(st) <= VIRTIO_BLK_S_UNSUPP,
                "invalid status {st} for chain {:?}",
                c.info
            );
        }
        let allowed = d.allowed(q, &chains);
        drop(chains);
        if let Some(gpa) = snap.unwrap().changed_outside(&mem, &allowed) {
            panic!("guest memory at {gpa:#x} changed outside writable buffers and the used ring");
        }
    }

    // As it is (chaos may have scribbled over the rings: only after a reset).
    if !d.chaos && d.is_active() {
        well_formed(&mut d, input.read_only, 1);
    }
    d.reset_and_reactivate();
    well_formed(&mut d, input.read_only, 2);
});
