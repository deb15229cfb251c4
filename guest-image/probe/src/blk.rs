//! virtio-blk (5.2): one request queue, requests of up to 64 KiB (or what
//! SIZE_MAX/SEG_MAX allow) with up to four in flight, FLUSH when offered,
//! GET_ID for the serial string.

use crate::virtio::{self, Arena, Error, Mmio, Virtq};

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const CFG_CAPACITY: usize = 0;
const CFG_SIZE_MAX: usize = 8;
const CFG_SEG_MAX: usize = 12;

/// The features `init` asks for.
const WANTED: u64 = F_SIZE_MAX | F_SEG_MAX | F_RO | F_FLUSH;

pub const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

pub const SECTOR: u64 = 512;
/// Largest request the probe makes, and the size of one I/O buffer slot.
pub const REQ_MAX: u64 = 64 * 1024;
/// Most requests in flight.
const DEPTH_MAX: usize = 4;
/// Bytes of the GET_ID answer.
const ID_LEN: usize = 20;
/// Seconds one request may take.
const TIMEOUT_S: u64 = 30;

/// What the device answered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    pub fn text(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::IoErr => "ioerr",
            Status::Unsupp => "unsupp",
        }
    }

    fn from_byte(b: u8) -> Status {
        match b {
            0 => Status::Ok,
            2 => Status::Unsupp,
            // 1 (IOERR), and anything else, including the 0xff the probe
            // leaves there when the device wrote no status at all.
            _ => Status::IoErr,
        }
    }
}

pub struct Blk {
    pub mmio: Mmio,
    q: Virtq,
    /// 512-byte sectors.
    pub capacity: u64,
    pub ro: bool,
    flush: bool,
    /// Largest data length of one request (a multiple of 512).
    pub req_max: u64,
    /// Largest data segment (SIZE_MAX), a multiple of 512.
    seg_len: u64,
    /// Page of request headers and status bytes: slot `s` has its header
    /// (16 bytes) at `32 * s` and its status byte at `32 * s + 16`; the
    /// GET_ID buffer is at 2048.
    hdrs: u64,
    /// Requests that fit in the queue at once (≤ DEPTH_MAX).
    depth: usize,
    /// Head descriptor of the request in each slot.
    heads: [u16; DEPTH_MAX],
    done: [bool; DEPTH_MAX],
}

impl Blk {
    pub fn init(mmio: Mmio, arena: &mut Arena) -> Result<Blk, (Mmio, Error)> {
        match Self::try_init(&mmio, arena) {
            Ok(parts) => Ok(Blk::assemble(mmio, parts)),
            Err(e) => Err((mmio, e)),
        }
    }

    fn try_init(mmio: &Mmio, arena: &mut Arena) -> Result<(u64, Virtq, u64), Error> {
        let features = mmio.begin_init(WANTED)?;
        let q = mmio.setup_queue(0, virtio::QUEUE_MAX, arena)?;
        let hdrs = arena.alloc(4096)?;
        mmio.driver_ok();
        Ok((features, q, hdrs))
    }

    fn assemble(mmio: Mmio, (features, q, hdrs): (u64, Virtq, u64)) -> Blk {
        let capacity = mmio.config_u64(CFG_CAPACITY);
        let mut seg_len = REQ_MAX;
        if features & F_SIZE_MAX != 0 {
            let size_max = u64::from(mmio.config_u32(CFG_SIZE_MAX));
            if size_max != 0 {
                seg_len = (size_max / SECTOR * SECTOR).clamp(SECTOR, REQ_MAX);
            }
        }
        // Without SEG_MAX a request carries one data segment (as Linux).
        let mut segs = 1;
        if features & F_SEG_MAX != 0 {
            segs = u64::from(mmio.config_u32(CFG_SEG_MAX)).max(1);
        }
        // Header and status take two descriptors.
        segs = segs.min(u64::from(q.size).saturating_sub(2)).max(1);
        let req_max = (seg_len * segs).min(REQ_MAX);
        let per_req = 2 + req_max.div_ceil(seg_len) as usize;
        let depth = (usize::from(q.size) / per_req).clamp(1, DEPTH_MAX);
        Blk {
            mmio,
            q,
            capacity,
            ro: features & F_RO != 0,
            flush: features & F_FLUSH != 0,
            req_max,
            seg_len,
            hdrs,
            depth,
            heads: [u16::MAX; DEPTH_MAX],
            done: [false; DEPTH_MAX],
        }
    }

    /// Resets the device and brings it up again as `init` did, in the same
    /// ring page (after a hostile command drove it with rings of its own).
    pub fn reinit(&mut self) -> Result<(), Error> {
        self.mmio.begin_init(WANTED)?;
        self.q = self
            .mmio
            .setup_queue_in(0, virtio::QUEUE_MAX, self.q.page())?;
        self.mmio.driver_ok();
        self.heads = [u16::MAX; DEPTH_MAX];
        self.done = [false; DEPTH_MAX];
        Ok(())
    }

    fn status_ptr(&self, slot: usize) -> *mut u8 {
        (self.hdrs + 32 * slot as u64 + 16) as *mut u8
    }

    /// Puts request `typ` for `sector` with `len` data bytes at `data` on
    /// the queue (not notified) in `slot`.
    fn submit(&mut self, slot: usize, typ: u32, sector: u64, data: u64, len: u64) {
        let hdr = self.hdrs + 32 * slot as u64;
        // SAFETY: slot headers lie in this device's header page (arena RAM);
        // the slot is not in flight, so the device does not read it now.
        unsafe {
            (hdr as *mut u32).write_volatile(typ);
            ((hdr + 4) as *mut u32).write_volatile(0);
            ((hdr + 8) as *mut u64).write_volatile(sector);
            self.status_ptr(slot).write_volatile(0xff);
        }
        let dev_writes = typ != T_OUT;
        let mut bufs = [(0u64, 0u32, false); 2 + (REQ_MAX / SECTOR) as usize];
        bufs[0] = (hdr, 16, false);
        let mut n = 1;
        let mut off = 0;
        while off < len {
            let l = (len - off).min(self.seg_len);
            bufs[n] = (data + off, l as u32, dev_writes);
            n += 1;
            off += l;
        }
        bufs[n] = (hdr + 16, 1, true);
        n += 1;
        // `depth` was chosen so that `depth` requests always fit.
        let head = self.q.push(&bufs[..n]).expect("virtio-blk: queue full");
        self.heads[slot] = head;
        self.done[slot] = false;
    }

    /// Consumes used entries, marking their slots done. The head is
    /// forgotten at once: its descriptors are free again and may become
    /// another slot's head before this slot is completed.
    fn reap(q: &mut Virtq, heads: &mut [u16; DEPTH_MAX], done: &mut [bool; DEPTH_MAX]) {
        while let Some((head, _)) = q.pop_used() {
            if let Some(s) = heads.iter().position(|&h| h == head) {
                done[s] = true;
                heads[s] = u16::MAX;
            }
        }
    }

    /// Waits for the request in `slot` and returns its status.
    fn complete(&mut self, slot: usize) -> Result<Status, Error> {
        let (q, heads, done) = (&mut self.q, &mut self.heads, &mut self.done);
        virtio::wait(&self.mmio, TIMEOUT_S, || {
            Self::reap(q, heads, done);
            done[slot]
        })?;
        // SAFETY: the device has used the request, so it no longer writes
        // the status byte (in our header page).
        let b = unsafe { self.status_ptr(slot).read_volatile() };
        Ok(Status::from_byte(b))
    }

    /// One request without data other than `len` bytes of the GET_ID buffer.
    fn simple(&mut self, typ: u32, len: u64) -> Result<Status, Error> {
        self.submit(0, typ, 0, self.hdrs + 2048, len);
        self.q.kick();
        self.complete(0)
    }

    /// FLUSH if the device offers it (without it the device has no
    /// volatile write cache: 5.2.6.2).
    pub fn flush(&mut self) -> Result<Status, Error> {
        if self.flush {
            self.simple(T_FLUSH, 0)
        } else {
            Ok(Status::Ok)
        }
    }

    /// The device ID string (GET_ID), up to 20 bytes, or None if the device
    /// does not support it.
    pub fn id(&mut self, out: &mut [u8; ID_LEN]) -> Result<Option<usize>, Error> {
        // SAFETY: the GET_ID buffer is in our header page, not in flight.
        unsafe { core::ptr::write_bytes((self.hdrs + 2048) as *mut u8, 0, ID_LEN) };
        if self.simple(T_GET_ID, ID_LEN as u64)? != Status::Ok {
            return Ok(None);
        }
        // SAFETY: the request completed; the device no longer writes there.
        let id = unsafe { &*((self.hdrs + 2048) as *const [u8; ID_LEN]) };
        *out = *id;
        Ok(Some(id.iter().position(|&b| b == 0).unwrap_or(ID_LEN)))
    }

    /// Transfers `sectors` sectors from `sector` on, in requests of up to
    /// `req_max` bytes with up to `depth` in flight, each request using its
    /// slot of `iobuf` (`iobuf_slots` slots of REQ_MAX bytes). For a write,
    /// `prepare(first_sector, buf)` fills each request's data before it is
    /// submitted; for a read, `consume(first_sector, buf)` sees each
    /// request's data after it completed, in disk order. Stops at the first
    /// failed request (after the ones in flight complete) and returns its
    /// status.
    #[allow(clippy::too_many_arguments)]
    pub fn transfer(
        &mut self,
        write: bool,
        sector: u64,
        sectors: u64,
        iobuf: u64,
        iobuf_slots: usize,
        mut prepare: impl FnMut(u64, &mut [u8]),
        mut consume: impl FnMut(u64, &[u8]),
    ) -> Result<Status, Error> {
        let depth = self.depth.min(iobuf_slots).max(1);
        let per = self.req_max / SECTOR;
        let chunks = sectors.div_ceil(per);
        let chunk = |c: u64| {
            let first = sector.wrapping_add(c * per);
            (first, per.min(sectors - c * per))
        };
        let buf_of = |c: u64| iobuf + (c % depth as u64) * REQ_MAX;
        let (mut next_submit, mut next_done) = (0u64, 0u64);
        let mut result = Status::Ok;
        while next_done < next_submit || (next_submit < chunks && result == Status::Ok) {
            let mut submitted = false;
            while result == Status::Ok
                && next_submit < chunks
                && next_submit - next_done < depth as u64
            {
                let (first, n) = chunk(next_submit);
                let buf = buf_of(next_submit);
                if write {
                    // SAFETY: the slot's buffer is arena RAM reserved for
                    // block/rng I/O; its previous request has completed, so
                    // the device does not touch it now.
                    let data = unsafe {
                        core::slice::from_raw_parts_mut(buf as *mut u8, (n * SECTOR) as usize)
                    };
                    prepare(first, data);
                }
                let typ = if write { T_OUT } else { T_IN };
                self.submit(
                    (next_submit % depth as u64) as usize,
                    typ,
                    first,
                    buf,
                    n * SECTOR,
                );
                next_submit += 1;
                submitted = true;
            }
            if submitted {
                self.q.kick();
            }
            let slot = (next_done % depth as u64) as usize;
            let st = self.complete(slot)?;
            if st == Status::Ok && result == Status::Ok && !write {
                let (first, n) = chunk(next_done);
                // SAFETY: as for writes: the read request has completed.
                let data = unsafe {
                    core::slice::from_raw_parts(
                        buf_of(next_done) as *const u8,
                        (n * SECTOR) as usize,
                    )
                };
                consume(first, data);
            }
            if result == Status::Ok {
                result = st;
            }
            next_done += 1;
        }
        Ok(result)
    }
}
