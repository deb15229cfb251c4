//! One virtio-blk request: parse the chain, run it against the image, write
//! the status byte.
//!
//! The layout is not trusted (virtio 1.x allows any framing): the header is
//! the first 16 readable bytes wherever they lie, OUT data the readable
//! bytes after it, the status the last writable byte, and IN data the
//! writable bytes before that. A chain whose buffers are not all in guest
//! memory still gets VIRTIO_BLK_S_IOERR if its last writable byte can be
//! found.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{Reader, Writer};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::image::DiskImage;
use crate::devices::virtio::queue::Chain;

/// The most segments one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// The most sectors one discard or write-zeroes segment may cover (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Bounce buffer size for data transfers.
const CHUNK: usize = 128 * 1024;

#[derive(Debug, Default)]
pub struct BlockCounters {
    pub requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Requests answered VIRTIO_BLK_S_IOERR.
    pub io_errors: AtomicU64,
    /// Requests answered VIRTIO_BLK_S_UNSUPP.
    pub unsupported: AtomicU64,
    /// Chains that could not be answered at all (no writable byte for the
    /// status) or whose buffers were not in guest memory.
    pub bad_chains: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the virtio-blk status values are 0, 1 and 2"
    )]
    fn byte(self) -> u8 {
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// What a request needs besides its chain.
pub struct Context<'a> {
    pub disk: &'a DiskImage,
    pub acked_features: u64,
    pub counters: &'a BlockCounters,
    pub bounce: &'a mut Vec<u8>,
}

/// Serves one chain; returns the number of bytes written into it.
pub fn handle(ctx: &mut Context<'_>, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
    ctx.counters.requests.fetch_add(1, Ordering::Relaxed);
    let fallback = chain.clone();
    let (mut reader, mut data) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            ctx.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
            return fail_without_writer(mem, fallback);
        }
    };
    let writable = data.available_bytes();
    let Some(mut status_w) = writable.checked_sub(1).and_then(|n| data.split_at(n).ok()) else {
        // No byte to put the status in: nothing can be reported.
        ctx.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
        return 0;
    };
    let status = execute(ctx, &mut reader, &mut data);
    match status {
        Status::Ok => {}
        Status::IoErr => {
            ctx.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        }
        Status::Unsupp => {
            ctx.counters.unsupported.fetch_add(1, Ordering::Relaxed);
        }
    }
    // The status byte was checked to be in guest memory when the writer was
    // built, so this cannot fail.
    let _ = status_w.write_all(&[status.byte()]);
    // Bounded by the chain's total length, which virtio-queue caps at 4 GiB.
    u32::try_from(data.bytes_written() + 1).unwrap_or(u32::MAX)
}

/// The chain had a buffer outside guest memory: report IOERR in the last
/// byte of its last writable buffer, if that one is valid.
fn fail_without_writer(mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
    let Some(last) = chain.writable().last() else {
        return 0;
    };
    let status_addr = last
        .len()
        .checked_sub(1)
        .and_then(|off| last.addr().0.checked_add(u64::from(off)));
    match status_addr {
        Some(a)
            if mem
                .write_obj(Status::IoErr.byte(), vm_memory::GuestAddress(a))
                .is_ok() =>
        {
            1
        }
        _ => 0,
    }
}

fn execute(ctx: &mut Context<'_>, reader: &mut Reader<'_>, data: &mut Writer<'_>) -> Status {
    let mut hdr = [0u8; 16];
    if reader.read_exact(&mut hdr).is_err() {
        warn_ratelimited!("virtio-blk: request without a 16-byte header");
        return Status::IoErr;
    }
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = hdr;
    let req_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes(s);
    let disk = ctx.disk;
    match req_type {
        VIRTIO_BLK_T_IN => {
            let len = data.available_bytes() as u64;
            match disk.range(sector, len) {
                Some(r) => read(ctx, r.offset, r.len, data),
                None => out_of_range("read", sector, len, disk),
            }
        }
        VIRTIO_BLK_T_OUT => {
            let len = reader.available_bytes() as u64;
            if disk.read_only() {
                return Status::IoErr;
            }
            match disk.range(sector, len) {
                Some(r) => write(ctx, r.offset, r.len, reader),
                None => out_of_range("write", sector, len, disk),
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if disk.read_only() {
                return Status::Ok;
            }
            match disk.flush() {
                Ok(()) => Status::Ok,
                Err(e) => io_error("flush", e),
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            let n = data.available_bytes().min(disk.id().len());
            match data.write_all(&disk.id()[..n]) {
                Ok(()) => Status::Ok,
                Err(_) => Status::IoErr,
            }
        }
        VIRTIO_BLK_T_DISCARD if ctx.acked_features & (1 << VIRTIO_BLK_F_DISCARD) != 0 => {
            segments(ctx, reader, false)
        }
        VIRTIO_BLK_T_WRITE_ZEROES if ctx.acked_features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0 => {
            segments(ctx, reader, true)
        }
        _ => Status::Unsupp,
    }
}

fn out_of_range(what: &str, sector: u64, len: u64, disk: &DiskImage) -> Status {
    warn_ratelimited!(
        "virtio-blk: {what} of {len} bytes at sector {sector} is outside {} ({} sectors) or not whole sectors",
        disk.path().display(),
        disk.capacity_sectors()
    );
    Status::IoErr
}

fn io_error(what: &str, e: std::io::Error) -> Status {
    warn_ratelimited!("virtio-blk: {what} failed: {e}");
    Status::IoErr
}

fn read(ctx: &mut Context<'_>, offset: u64, len: u64, data: &mut Writer<'_>) -> Status {
    ctx.bounce.resize(CHUNK, 0);
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(CHUNK, |left| left.min(CHUNK));
        let buf = &mut ctx.bounce[..n];
        if let Err(e) = ctx.disk.read_exact_at(buf, offset + done) {
            return io_error("read", e);
        }
        if data.write_all(buf).is_err() {
            return Status::IoErr;
        }
        done += n as u64;
    }
    ctx.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
    Status::Ok
}

fn write(ctx: &mut Context<'_>, offset: u64, len: u64, src: &mut Reader<'_>) -> Status {
    ctx.bounce.resize(CHUNK, 0);
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(CHUNK, |left| left.min(CHUNK));
        let buf = &mut ctx.bounce[..n];
        if src.read_exact(buf).is_err() {
            return Status::IoErr;
        }
        if let Err(e) = ctx.disk.write_all_at(buf, offset + done) {
            return io_error("write", e);
        }
        done += n as u64;
    }
    ctx.counters.write_bytes.fetch_add(len, Ordering::Relaxed);
    Status::Ok
}

/// DISCARD or WRITE_ZEROES: an array of 16-byte
/// `{ le64 sector; le32 num_sectors; le32 flags }` segments.
fn segments(ctx: &mut Context<'_>, reader: &mut Reader<'_>, zeroes: bool) -> Status {
    let disk = ctx.disk;
    if disk.read_only() {
        return Status::IoErr;
    }
    let bytes = reader.available_bytes();
    let count = bytes / 16;
    if bytes % 16 != 0 || count == 0 || count > MAX_DISCARD_SEGMENTS as usize {
        warn_ratelimited!("virtio-blk: discard/write-zeroes with {bytes} bytes of segments");
        return Status::IoErr;
    }
    let allowed_flags = if zeroes {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    for _ in 0..count {
        let mut seg = [0u8; 16];
        if reader.read_exact(&mut seg).is_err() {
            return Status::IoErr;
        }
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = seg;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        // virtio 1.2, 5.2.6.2: unknown flags (and unmap on a discard) are
        // unsupported, not errors.
        if flags & !allowed_flags != 0 {
            return Status::Unsupp;
        }
        if sectors > MAX_DISCARD_SECTORS {
            return Status::IoErr;
        }
        let Some(r) = disk.sector_range(sector, sectors) else {
            return out_of_range("discard", sector, u64::from(sectors) * 512, disk);
        };
        let result = if zeroes {
            disk.write_zeroes(r)
        } else {
            match disk.punch_hole(r) {
                // Discard is a hint: a file system without holes may ignore it.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                other => other,
            }
        };
        if let Err(e) = result {
            return io_error(if zeroes { "write zeroes" } else { "discard" }, e);
        }
    }
    Status::Ok
}
