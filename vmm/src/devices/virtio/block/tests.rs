use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::arch::x86_64::layout::fit_u8;
use crate::config::devices::DiskId;
use crate::devices::virtio::test_util::*;

const HDR: u64 = DATA;
const STATUS: u64 = DATA + 0x100;
const BUF: u64 = DATA + 0x1_0000;
const SECTORS: u64 = 256;

/// An image of SECTORS sectors where byte i of sector s is (s + i) as u8.
fn image(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.path().join(name);
    let data: Vec<u8> = (0..SECTORS * 512)
        .map(|i| (((i / 512) + (i % 512)) & 0xff) as u8)
        .collect();
    std::fs::write(&p, data).unwrap();
    p
}

fn cfg(path: &std::path::Path) -> DiskConfig {
    DiskConfig::new(path)
}

struct Up<'a> {
    h: Harness,
    q: GuestQueue<'a>,
    mem: &'a GuestMemoryMmap,
    counters: Arc<BlockCounters>,
}

fn up_with<'a>(mem: &'a Arc<GuestMemoryMmap>, c: &DiskConfig, features: u64) -> Up<'a> {
    let blk = Block::new(c, mem).unwrap();
    let counters = blk.counters();
    let mut h = Harness::with_mem(blk, mem.clone());
    let q = GuestQueue::new(mem, 0x1_0000, 64);
    h.activate(features, &[&q]);
    Up {
        h,
        q,
        mem,
        counters,
    }
}

fn up<'a>(mem: &'a Arc<GuestMemoryMmap>, c: &DiskConfig) -> Up<'a> {
    up_with(
        mem,
        c,
        1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES | 1 << VIRTIO_BLK_F_FLUSH,
    )
}

impl Up<'_> {
    fn header(&self, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Sends header + `data` + status; returns (status, used len).
    fn request(&mut self, t: u32, sector: u64, data: &[Desc]) -> (u8, u32) {
        self.header(t, sector);
        let mut chain = vec![r(HDR, 16)];
        chain.extend_from_slice(data);
        chain.push(w(STATUS, 1));
        let head = self.q.add(&chain);
        self.h.kick(0);
        let (id, len) = self.q.last_used();
        assert_eq!(id, u32::from(head));
        (self.status(), len)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn segments(&self, segs: &[(u64, u32, u32)]) -> u32 {
        let mut b = Vec::new();
        for &(s, n, f) in segs {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            b.extend_from_slice(&f.to_le_bytes());
        }
        self.mem.write_slice(&b, GuestAddress(BUF)).unwrap();
        u32::try_from(b.len()).unwrap()
    }
}

fn expected(sector: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((sector + i / 512 + i % 512) & 0xff) as u8)
        .collect()
}

const OK: u8 = fit_u8(VIRTIO_BLK_S_OK as u64);
const IOERR: u8 = fit_u8(VIRTIO_BLK_S_IOERR as u64);
const UNSUPP: u8 = fit_u8(VIRTIO_BLK_S_UNSUPP as u64);

#[test]
fn config_space_and_features() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(&p));
    assert_eq!(u.h.config(0, 8), SECTORS.to_le_bytes());
    assert_eq!(u.h.config(12, 4), 254u32.to_le_bytes(), "seg_max");
    assert_eq!(u.h.config(40, 4), MAX_DISCARD_SEGMENTS.to_le_bytes());
    let f = u.h.device_features();
    assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
    assert_ne!(f & 1 << VIRTIO_BLK_F_FLUSH, 0);
    drop(u);
    let ro = DiskConfig {
        read_only: true,
        ..cfg(&p)
    };
    let mut u = up(&mem, &ro);
    assert_ne!(u.h.device_features() & 1 << VIRTIO_BLK_F_RO, 0);
}

#[test]
fn capacity_ignores_a_partial_last_sector() {
    let dir = TempDir::new();
    let p = dir.path().join("odd.img");
    std::fs::write(&p, vec![0u8; 512 * 3 + 100]).unwrap();
    let blk = Block::new(&cfg(&p), &guest_mem()).unwrap();
    assert_eq!(blk.capacity_sectors(), 3);
}

#[test]
fn reads_into_guest_memory() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(&p));
    assert_eq!(u.request(VIRTIO_BLK_T_IN, 3, &[w(BUF, 1024)]), (OK, 1025));
    assert_eq!(u.guest(BUF, 1024), expected(3, 1024));
    // Split across two buffers, and a large one that needs several chunks.
    assert_eq!(
        u.request(VIRTIO_BLK_T_IN, 10, &[w(BUF, 512), w(BUF + 0x10000, 1536)]),
        (OK, 2049)
    );
    assert_eq!(u.guest(BUF, 512), expected(10, 512));
    assert_eq!(u.guest(BUF + 0x10000, 1536), expected(11, 1536));
    assert_eq!(
        u.request(VIRTIO_BLK_T_IN, 0, &[w(BUF, 256 * 512)]),
        (OK, 256 * 512 + 1)
    );
    assert_eq!(u.guest(BUF, 256 * 512), expected(0, 256 * 512));
    assert_eq!(
        u.counters.read_bytes.load(Ordering::Relaxed),
        (2 + 4 + 256) * 512
    );
    assert_eq!(u.h.take_irq(), 3, "one interrupt per kick");
}

#[test]
fn writes_reach_the_file_and_flush_succeeds() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(&p));
    mem.write_slice(&[0xab; 1024], GuestAddress(BUF)).unwrap();
    assert_eq!(u.request(VIRTIO_BLK_T_OUT, 7, &[r(BUF, 1024)]), (OK, 1));
    assert_eq!(u.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    let f = std::fs::read(&p).unwrap();
    assert!(f[7 * 512..9 * 512].iter().all(|&b| b == 0xab));
    assert_eq!(f[9 * 512..10 * 512], expected(9, 512)[..]);
}

#[test]
fn any_layout_header_split_and_status_inside_a_data_buffer() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(&p));
    u.header(VIRTIO_BLK_T_IN, 2);
    // Header in two pieces; data and status share one writable buffer.
    let head = u.q.add(&[r(HDR, 4), r(HDR + 4, 12), w(BUF, 513)]);
    u.h.kick(0);
    assert_eq!(u.q.last_used(), (u32::from(head), 513));
    assert_eq!(u.guest(BUF, 512), expected(2, 512));
    assert_eq!(u.guest(BUF + 512, 1), vec![OK]);
}

#[test]
fn get_id_returns_the_configured_or_derived_serial() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let c = DiskConfig {
        id: Some(DiskId::try_from("rootdisk".to_owned()).unwrap()),
        ..cfg(&p)
    };
    let mut u = up(&mem, &c);
    assert_eq!(u.request(VIRTIO_BLK_T_GET_ID, 0, &[w(BUF, 20)]), (OK, 21));
    assert_eq!(&u.guest(BUF, 20)[..], b"rootdisk\0\0\0\0\0\0\0\0\0\0\0\0");
    // A short buffer gets what fits.
    assert_eq!(u.request(VIRTIO_BLK_T_GET_ID, 0, &[w(BUF, 4)]), (OK, 5));
    drop(u);
    let mut u = up(&mem, &cfg(&p));
    u.request(VIRTIO_BLK_T_GET_ID, 0, &[w(BUF, 20)]);
    let m = std::fs::metadata(&p).unwrap();
    let want = format!("{:x}{:x}", m.dev(), m.ino());
    let n = want.len().min(20);
    assert_eq!(&u.guest(BUF, n)[..], &want.as_bytes()[..n]);
}

#[test]
fn read_only_disks_refuse_every_kind_of_write() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let before = std::fs::read(&p).unwrap();
    let mem = guest_mem();
    let ro = DiskConfig {
        read_only: true,
        ..cfg(&p)
    };
    let mut u = up(&mem, &ro);
    mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
    assert_eq!(u.request(VIRTIO_BLK_T_OUT, 0, &[r(BUF, 512)]).0, IOERR);
    let n = u.segments(&[(0, 8, 0)]);
    assert_eq!(u.request(VIRTIO_BLK_T_DISCARD, 0, &[r(BUF, n)]).0, IOERR);
    assert_eq!(
        u.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(BUF, n)]).0,
        IOERR
    );
    assert_eq!(u.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    assert_eq!(u.request(VIRTIO_BLK_T_IN, 0, &[w(BUF, 512)]).0, OK);
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(u.counters.io_errors.load(Ordering::Relaxed), 3);
}

#[test]
fn out_of_range_and_partial_sectors_are_io_errors() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(&p));
    let cases: &[(u32, u64, Desc)] = &[
        (VIRTIO_BLK_T_IN, SECTORS, w(BUF, 512)),
        (VIRTIO_BLK_T_IN, SECTORS - 1, w(BUF, 1024)),
        (VIRTIO_BLK_T_IN, u64::MAX, w(BUF, 512)),
        (VIRTIO_BLK_T_IN, u64::MAX / 512 + 1, w(BUF, 512)),
        (VIRTIO_BLK_T_IN, 0, w(BUF, 100)),
        (VIRTIO_BLK_T_OUT, SECTORS, r(BUF, 512)),
        (VIRTIO_BLK_T_OUT, u64::MAX, r(BUF, 512)),
        (VIRTIO_BLK_T_OUT, 0, r(BUF, 513)),
    ];
    for (i, &(t, sector, d)) in cases.iter().enumerate() {
        assert_eq!(u.request(t, sector, &[d]).0, IOERR, "case {i}");
    }
    // The last sector is fine.
    assert_eq!(
        u.request(VIRTIO_BLK_T_IN, SECTORS - 1, &[w(BUF, 512)]).0,
        OK
    );
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        SECTORS * 512,
        "file not grown"
    );
}

#[test]
fn discard_punches_holes_and_write_zeroes_zeroes() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(&p));
    let blocks_before = std::fs::metadata(&p).unwrap().blocks();
    let n = u.segments(&[(0, 128, 0)]);
    assert_eq!(u.request(VIRTIO_BLK_T_DISCARD, 0, &[r(BUF, n)]), (OK, 1));
    let n = u.segments(&[(200, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), (240, 1, 0)]);
    assert_eq!(
        u.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(BUF, n)]),
        (OK, 1)
    );
    let f = std::fs::read(&p).unwrap();
    assert_eq!(f.len() as u64, SECTORS * 512, "size kept");
    assert!(f[200 * 512..208 * 512].iter().all(|&b| b == 0));
    assert!(f[240 * 512..241 * 512].iter().all(|&b| b == 0));
    assert_eq!(f[208 * 512..209 * 512], expected(208, 512)[..]);
    assert_eq!(f[128 * 512..129 * 512], expected(128, 512)[..]);
    // The discarded 64 KiB are gone from the disk (where holes exist) or
    // still read back as what they were; either way the rest is intact.
    let blocks_after = std::fs::metadata(&p).unwrap().blocks();
    assert!(blocks_after <= blocks_before);
}

#[test]
fn malformed_discards() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(&p));
    let n = u.segments(&[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]);
    assert_eq!(
        u.request(VIRTIO_BLK_T_DISCARD, 0, &[r(BUF, n)]).0,
        UNSUPP,
        "unmap on discard"
    );
    let n = u.segments(&[(0, 8, 2)]);
    assert_eq!(
        u.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(BUF, n)]).0,
        UNSUPP
    );
    assert_eq!(
        u.request(VIRTIO_BLK_T_DISCARD, 0, &[r(BUF, 15)]).0,
        IOERR,
        "partial segment"
    );
    assert_eq!(
        u.request(VIRTIO_BLK_T_DISCARD, 0, &[]).0,
        IOERR,
        "no segment"
    );
    let many = vec![(0u64, 1u32, 0u32); MAX_DISCARD_SEGMENTS as usize + 1];
    let n = u.segments(&many);
    assert_eq!(
        u.request(VIRTIO_BLK_T_DISCARD, 0, &[r(BUF, n)]).0,
        IOERR,
        "too many"
    );
    for seg in [
        (SECTORS, 1, 0),
        (SECTORS - 1, 2, 0),
        (u64::MAX, 1, 0),
        (0, u32::MAX, 0),
    ] {
        let n = u.segments(&[seg]);
        assert_eq!(
            u.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(BUF, n)]).0,
            IOERR,
            "{seg:?}"
        );
        assert_eq!(
            u.request(VIRTIO_BLK_T_DISCARD, 0, &[r(BUF, n)]).0,
            IOERR,
            "{seg:?}"
        );
    }
    assert_eq!(std::fs::read(&p).unwrap()[..512], expected(0, 512)[..]);
}

#[test]
fn unnegotiated_and_unknown_requests_are_unsupported() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let mut u = up_with(&mem, &cfg(&p), 0);
    let n = u.segments(&[(0, 8, 0)]);
    assert_eq!(u.request(VIRTIO_BLK_T_DISCARD, 0, &[r(BUF, n)]).0, UNSUPP);
    assert_eq!(
        u.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[r(BUF, n)]).0,
        UNSUPP
    );
    assert_eq!(u.request(VIRTIO_BLK_T_SCSI_CMD, 0, &[]).0, UNSUPP);
    assert_eq!(u.request(0xdead_beef, 0, &[]).0, UNSUPP);
    assert_eq!(u.counters.unsupported.load(Ordering::Relaxed), 4);
}

#[test]
fn chains_that_cannot_be_served_still_get_a_status_where_possible() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(&p));
    // Short header.
    u.header(VIRTIO_BLK_T_IN, 0);
    u.q.add(&[r(HDR, 8), w(STATUS, 1)]);
    u.h.kick(0);
    assert_eq!((u.status(), u.q.last_used().1), (IOERR, 1));
    // Data buffer outside guest memory: status still written.
    assert_eq!(u.request(VIRTIO_BLK_T_IN, 0, &[w(FAR, 512)]), (IOERR, 1));
    assert_eq!(u.request(VIRTIO_BLK_T_OUT, 0, &[r(FAR, 512)]), (IOERR, 1));
    // Status outside guest memory: nothing to report, nothing written.
    u.header(VIRTIO_BLK_T_IN, 0);
    u.q.add(&[r(HDR, 16), w(BUF, 512), w(FAR, 1)]);
    u.h.kick(0);
    assert_eq!(u.q.last_used().1, 0);
    // No writable byte at all.
    u.q.add(&[r(HDR, 16), r(BUF, 512)]);
    u.h.kick(0);
    assert_eq!(u.q.last_used().1, 0);
    assert_eq!(u.counters.bad_chains.load(Ordering::Relaxed), 4);
    assert!(u.h.transport.is_active());
}

#[test]
fn survives_hostile_chains() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let before = std::fs::read(&p).unwrap();
    let mem = guest_mem();
    let Up { mut h, mut q, .. } = up(&mem, &cfg(&p));
    hostile_battery(&mut h, &mut q, &mut |h| h.kick(0), &mut |h, q| {
        let mut hdr = [0u8; 16];
        hdr[8..].copy_from_slice(&5u64.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = q.add(&[r(HDR, 16), w(BUF, 512), w(STATUS, 1)]);
        h.kick(0);
        assert_eq!(q.last_used(), (u32::from(head), 513));
        let st: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(st, OK);
    });
    // The hostile chains that happened to look like writes only ever
    // wrote inside the image.
    assert_eq!(std::fs::metadata(&p).unwrap().len(), before.len() as u64);
}

#[test]
fn writable_images_are_exclusive_and_read_only_ones_shared() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let ro = DiskConfig {
        read_only: true,
        ..cfg(&p)
    };
    let first = Block::new(&cfg(&p), &guest_mem()).unwrap();
    let err = Block::new(&cfg(&p), &guest_mem())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        format!(
            "disk image {} is already open in this VM (the same disk given twice?)",
            p.display()
        )
    );
    assert!(
        Block::new(&ro, &guest_mem()).is_err(),
        "reader while a writer holds it"
    );
    drop(first);
    let r1 = Block::new(&ro, &guest_mem()).unwrap();
    let _r2 = Block::new(&ro, &guest_mem()).unwrap();
    assert!(
        Block::new(&cfg(&p), &guest_mem()).is_err(),
        "writer while readers hold it"
    );
    drop((r1, _r2));
    Block::new(&cfg(&p), &guest_mem()).unwrap();
}

#[test]
fn a_lock_held_by_another_process_names_its_pid() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    // flock(1) from util-linux holds the lock in a child process.
    let mut child = match std::process::Command::new("flock")
        .arg("-x")
        .arg(&p)
        .args(["sleep", "30"])
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipping: cannot run flock(1): {e}");
            return;
        }
    };
    let mut err = String::new();
    for _ in 0..200 {
        match Block::new(&cfg(&p), &guest_mem()) {
            Err(e) => {
                err = e.to_string();
                break;
            }
            Ok(b) => {
                drop(b);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(err.contains(&p.display().to_string()), "{err}");
    assert!(err.contains("lock held by pid "), "{err}");
    assert!(
        !err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
}

#[test]
fn open_errors_name_the_path() {
    let dir = TempDir::new();
    let missing = dir.path().join("missing.img");
    let e = Block::new(&cfg(&missing), &guest_mem())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with(&format!("cannot open disk image {}", missing.display())),
        "{e}"
    );
    let e = Block::new(&cfg(dir.path()), &guest_mem())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
}

#[test]
fn requests_larger_than_the_maximum_are_refused_without_touching_the_image() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(&p));
    assert_eq!(
        u.h.config(8, 4),
        MAX_SEGMENT_BYTES.to_le_bytes(),
        "size_max bounds what Linux puts in one segment"
    );
    assert_ne!(u.h.device_features() & 1 << VIRTIO_BLK_F_SIZE_MAX, 0);
    // 17 descriptors naming one 1 MiB buffer: 17 MiB of reads from a
    // 128 KiB image, the aliasing attack in small.
    let alias: Vec<Desc> = (0..17).map(|_| w(BUF, 1 << 20)).collect();
    assert_eq!(u.request(VIRTIO_BLK_T_IN, 0, &alias), (IOERR, 1));
    let alias: Vec<Desc> = (0..17).map(|_| r(BUF, 1 << 20)).collect();
    assert_eq!(u.request(VIRTIO_BLK_T_OUT, 0, &alias), (IOERR, 1));
    assert_eq!(u.counters.too_large.load(Ordering::Relaxed), 2);
    assert_eq!(u.counters.read_bytes.load(Ordering::Relaxed), 0);
    assert_eq!(u.counters.write_bytes.load(Ordering::Relaxed), 0);
    // The largest request that is allowed still works (aliased reads of
    // one 64 KiB sector range).
    let ok: Vec<Desc> = (0..2).map(|_| w(BUF, 64 * 1024)).collect();
    assert_eq!(u.request(VIRTIO_BLK_T_IN, 0, &ok), (OK, 128 * 1024 + 1));
}

#[test]
fn a_rate_limited_disk_leaves_requests_in_the_ring_until_its_timer_fires() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let mem = guest_mem();
    let c = DiskConfig {
        iops: Some(crate::config::devices::Rate(5)),
        ..cfg(&p)
    };
    let mut u = up(&mem, &c);
    let heads: Vec<u16> = (0..6)
        .map(|_| {
            u.header(VIRTIO_BLK_T_IN, 0);
            u.q.add(&[r(HDR, 16), w(BUF, 512), w(STATUS, 1)])
        })
        .collect();
    u.h.kick(0);
    assert_eq!(
        u.q.used_idx(),
        5,
        "a full bucket holds one second: 5 requests"
    );
    let timer = u.h.transport.event_sources()[1].fd;
    let t0 = std::time::Instant::now();
    assert!(
        wait_readable(timer, 2000),
        "the limiter's timer never fired"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(100),
        "one request at 5/s waits ~200 ms, not {waited:?}"
    );
    u.h.transport.handle_event(1);
    u.h.transport.drain_io();
    assert_eq!(u.q.used_idx(), 6);
    assert_eq!(u.q.last_used().0, u32::from(heads[5]));
    let stats: std::collections::HashMap<_, _> =
        u.h.transport.device_mut().counters().into_iter().collect();
    assert!(stats["throttled_ms"] >= 100, "{stats:?}");
    assert_eq!(stats["requests"], 6);
}
