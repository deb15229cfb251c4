//! One virtio-blk request: parsed from its chain on the event loop
//! ([`parse`]), run against the image on the disk's I/O thread
//! ([`execute`]), its status byte written there too.
//!
//! The layout is not trusted (virtio 1.x allows any framing): the header is
//! the first 16 readable bytes wherever they lie, OUT data the readable
//! bytes after it, the status the last writable byte, and IN data the
//! writable bytes before that. A chain whose buffers are not all in guest
//! memory still gets VIRTIO_BLK_S_IOERR if its last writable byte can be
//! found. Parsing touches only the header and discard segments; the data
//! buffers are kept as guest addresses for the I/O thread, so that a chain
//! costs the event loop the same whatever its size.

use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::image::{DiskImage, Range};
use super::sg::Buffers;
use crate::devices::virtio::queue::Chain;

/// The most segments one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// The most sectors one discard or write-zeroes segment may cover (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// The largest data segment the device accepts (advertised as size_max).
pub const MAX_SEGMENT_BYTES: u32 = 64 * 1024;
/// The most data one read or write may carry: seg_max (254) segments of
/// size_max. Linux never builds larger requests for these limits; anything
/// larger (a hostile chain that names one buffer many times, say) is
/// answered VIRTIO_BLK_S_IOERR without touching the image.
pub const MAX_REQUEST_BYTES: u64 = 254 * MAX_SEGMENT_BYTES as u64;

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
    /// Reads and writes refused for carrying more than MAX_REQUEST_BYTES.
    pub too_large: AtomicU64,
    /// Requests failed unexecuted because the VM was stopping.
    pub failed_at_stop: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the virtio-blk status values are 0, 1 and 2"
    )]
    pub fn byte(self) -> u8 {
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// What a request asks of the image.
#[derive(Debug)]
pub enum Op {
    Read {
        at: Range,
        into: Buffers,
    },
    Write {
        at: Range,
        from: Buffers,
    },
    Flush,
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
    /// Decided while parsing (GET_ID, errors): only the status is written.
    Answer(Status),
}

/// A parsed request, ready for the I/O thread.
#[derive(Debug)]
pub struct Request {
    pub head: u16,
    pub op: Op,
    /// Where the status byte goes; None for a chain that cannot be answered.
    pub status_at: Option<GuestAddress>,
    /// The used length to report on success (data read + status).
    pub used_len: u32,
}

impl Request {
    /// Data bytes the request moves, for the rate limiter.
    pub fn data_bytes(&self) -> u64 {
        match &self.op {
            Op::Read { at, .. } | Op::Write { at, .. } => at.len,
            _ => 0,
        }
    }
}

/// What parsing needs besides the chain.
pub struct Context<'a> {
    pub disk: &'a DiskImage,
    pub acked_features: u64,
    pub counters: &'a BlockCounters,
}

fn answer(head: u16, status_at: Option<GuestAddress>, status: Status) -> Request {
    Request {
        head,
        op: Op::Answer(status),
        status_at,
        used_len: u32::from(status_at.is_some()),
    }
}

/// Parses one chain into a request.
pub fn parse(ctx: &Context<'_>, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Request {
    ctx.counters.requests.fetch_add(1, Ordering::Relaxed);
    let head = chain.head_index();
    let readable = Buffers::from_descriptors(chain.clone().readable());
    let writable = Buffers::from_descriptors(chain.writable());
    let (mut data_in, status_at) = match writable.split_last_byte() {
        Some(split) => split,
        None => {
            // No byte to put the status in: nothing can be reported.
            ctx.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
            return answer(head, None, Status::IoErr);
        }
    };
    let status_ok = mem.address_in_range(status_at);
    if !status_ok || !readable.in_memory(mem) || !data_in.in_memory(mem) {
        ctx.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
        return answer(head, status_ok.then_some(status_at), Status::IoErr);
    }
    let mut data_out = readable;
    let mut hdr = [0u8; 16];
    if !data_out.read_front(mem, &mut hdr) {
        warn_ratelimited!("virtio-blk: request without a 16-byte header");
        return answer(head, Some(status_at), Status::IoErr);
    }
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = hdr;
    let req_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes(s);
    let disk = ctx.disk;
    let done = |status| answer(head, Some(status_at), status);
    let op = match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (what, bufs) = if req_type == VIRTIO_BLK_T_IN {
                ("read", data_in)
            } else {
                ("write", data_out)
            };
            let len = bufs.len();
            if len > MAX_REQUEST_BYTES {
                ctx.counters.too_large.fetch_add(1, Ordering::Relaxed);
                warn_ratelimited!(
                    "virtio-blk: refusing a {len}-byte {what}: requests carry at most {MAX_REQUEST_BYTES} bytes"
                );
                return done(Status::IoErr);
            }
            if req_type == VIRTIO_BLK_T_OUT && disk.read_only() {
                return done(Status::IoErr);
            }
            let Some(at) = disk.range(sector, len) else {
                return done(out_of_range(what, sector, len, disk));
            };
            if req_type == VIRTIO_BLK_T_IN {
                let used_len = u32::try_from(len + 1).unwrap_or(u32::MAX);
                return Request {
                    head,
                    op: Op::Read { at, into: bufs },
                    status_at: Some(status_at),
                    used_len,
                };
            }
            Op::Write { at, from: bufs }
        }
        VIRTIO_BLK_T_FLUSH if disk.read_only() => Op::Answer(Status::Ok),
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_GET_ID => {
            let n = data_in.write_front(mem, disk.id());
            let used_len = u32::try_from(n + 1).unwrap_or(u32::MAX);
            return Request {
                used_len,
                ..done(Status::Ok)
            };
        }
        VIRTIO_BLK_T_DISCARD if ctx.acked_features & (1 << VIRTIO_BLK_F_DISCARD) != 0 => {
            match segments(disk, mem, &mut data_out, false) {
                Ok(ranges) => Op::Discard(ranges),
                Err(status) => Op::Answer(status),
            }
        }
        VIRTIO_BLK_T_WRITE_ZEROES if ctx.acked_features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0 => {
            match segments(disk, mem, &mut data_out, true) {
                Ok(ranges) => Op::WriteZeroes(ranges),
                Err(status) => Op::Answer(status),
            }
        }
        _ => Op::Answer(Status::Unsupp),
    };
    Request {
        head,
        op,
        status_at: Some(status_at),
        used_len: 1,
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

/// DISCARD or WRITE_ZEROES: an array of 16-byte
/// `{ le64 sector; le32 num_sectors; le32 flags }` segments, validated here.
fn segments(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    data: &mut Buffers,
    zeroes: bool,
) -> Result<Vec<Range>, Status> {
    if disk.read_only() {
        return Err(Status::IoErr);
    }
    let bytes = data.len();
    let count = bytes / 16;
    if bytes % 16 != 0 || count == 0 || count > u64::from(MAX_DISCARD_SEGMENTS) {
        warn_ratelimited!("virtio-blk: discard/write-zeroes with {bytes} bytes of segments");
        return Err(Status::IoErr);
    }
    let allowed_flags = if zeroes {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    let mut out = Vec::new();
    for _ in 0..count {
        let mut seg = [0u8; 16];
        if !data.read_front(mem, &mut seg) {
            return Err(Status::IoErr);
        }
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = seg;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        // virtio 1.2, 5.2.6.2: unknown flags (and unmap on a discard) are
        // unsupported, not errors.
        if flags & !allowed_flags != 0 {
            return Err(Status::Unsupp);
        }
        if sectors > MAX_DISCARD_SECTORS {
            return Err(Status::IoErr);
        }
        let Some(r) = disk.sector_range(sector, sectors) else {
            return Err(out_of_range(
                "discard",
                sector,
                u64::from(sectors) * 512,
                disk,
            ));
        };
        out.push(r);
    }
    Ok(out)
}

/// Runs a parsed request on the I/O thread; returns its status.
pub fn execute(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    counters: &BlockCounters,
    bounce: &mut Vec<u8>,
    op: &Op,
) -> Status {
    let io = |what: &str, r: std::io::Result<()>| match r {
        Ok(()) => Status::Ok,
        Err(e) => {
            warn_ratelimited!("virtio-blk: {what} failed: {e}");
            Status::IoErr
        }
    };
    match op {
        Op::Answer(s) => *s,
        Op::Read { at, into } => {
            let s = io("read", read(disk, mem, bounce, *at, into));
            if s == Status::Ok {
                counters.read_bytes.fetch_add(at.len, Ordering::Relaxed);
            }
            s
        }
        Op::Write { at, from } => {
            let s = io("write", write(disk, mem, bounce, *at, from));
            if s == Status::Ok {
                counters.write_bytes.fetch_add(at.len, Ordering::Relaxed);
            }
            s
        }
        Op::Flush => io("flush", disk.flush()),
        Op::Discard(ranges) => {
            for r in ranges {
                match disk.punch_hole(*r) {
                    // Discard is a hint: a file system without holes may ignore it.
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                    other => {
                        if io("discard", other) != Status::Ok {
                            return Status::IoErr;
                        }
                    }
                }
            }
            Status::Ok
        }
        Op::WriteZeroes(ranges) => {
            for r in ranges {
                if io("write zeroes", disk.write_zeroes(*r)) != Status::Ok {
                    return Status::IoErr;
                }
            }
            Status::Ok
        }
    }
}

/// Bounce buffer size for data transfers.
const CHUNK: usize = 128 * 1024;

fn guest_gone(_: super::sg::OutOfGuestMemory) -> std::io::Error {
    std::io::Error::other("a data buffer is outside guest memory")
}

/// Image range `at` into the guest's buffers, a chunk at a time.
fn read(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    bounce: &mut Vec<u8>,
    at: Range,
    into: &Buffers,
) -> std::io::Result<()> {
    bounce.resize(CHUNK, 0);
    let mut cursor = into.cursor();
    let mut done = 0u64;
    while done < at.len {
        let n = usize::try_from(at.len - done).map_or(CHUNK, |left| left.min(CHUNK));
        let buf = &mut bounce[..n];
        disk.read_exact_at(buf, at.offset + done)?;
        cursor.write(mem, buf).map_err(guest_gone)?;
        done += n as u64;
    }
    Ok(())
}

/// The guest's buffers into image range `at`, a chunk at a time.
fn write(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    bounce: &mut Vec<u8>,
    at: Range,
    from: &Buffers,
) -> std::io::Result<()> {
    bounce.resize(CHUNK, 0);
    let mut cursor = from.cursor();
    let mut done = 0u64;
    while done < at.len {
        let n = usize::try_from(at.len - done).map_or(CHUNK, |left| left.min(CHUNK));
        let buf = &mut bounce[..n];
        cursor.read(mem, buf).map_err(guest_gone)?;
        disk.write_all_at(buf, at.offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Writes the status byte and counts the outcome; returns the used length.
pub fn finish(mem: &GuestMemoryMmap, counters: &BlockCounters, req: &Request, s: Status) -> u32 {
    match s {
        Status::Ok => {}
        Status::IoErr => {
            counters.io_errors.fetch_add(1, Ordering::Relaxed);
        }
        Status::Unsupp => {
            counters.unsupported.fetch_add(1, Ordering::Relaxed);
        }
    }
    let Some(at) = req.status_at else {
        return 0;
    };
    // Checked to be in guest memory when the request was parsed.
    if mem.write_obj(s.byte(), at).is_err() {
        return 0;
    }
    if s == Status::Ok {
        req.used_len
    } else {
        1
    }
}
