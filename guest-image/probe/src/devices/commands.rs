//! The serial commands of the block and net devices (`blk-*`, `net-*`)
//! other than the hostile ones (`hostile.rs`), and the block content they
//! write and check.

use super::Args;
use crate::blk::{self, Blk, Status};
use crate::io::{put_bytes, put_dec, put_hex16, put_str, putc};
use crate::net::{self, Net};
use crate::time;
use crate::virtio::Error;
use probe_pattern::{fill_sector, Checksum, PAGE_WORDS, SECTOR_WORDS};

/// Most sectors one `blk-write`/`blk-read` moves (8 GiB).
const BLK_COUNT_MAX: u64 = 1 << 24;
/// Most frames one `net-send` sends.
pub const NET_COUNT_MAX: u64 = 1 << 32;

/// Streams bytes into 4 KiB pages for a `Checksum` (the last page zero-
/// padded), as `probe_pattern::checksum_bytes` defines.
struct PageStream {
    sum: Checksum,
    page: [u64; PAGE_WORDS],
    words: usize,
}

impl PageStream {
    fn new() -> Self {
        PageStream {
            sum: Checksum::new(),
            page: [0; PAGE_WORDS],
            words: 0,
        }
    }

    /// Feeds whole sectors.
    fn feed(&mut self, data: &[u8]) {
        for w in data.chunks_exact(8) {
            self.page[self.words] = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
            self.words += 1;
            if self.words == PAGE_WORDS {
                self.sum.update_page(&self.page);
                self.words = 0;
            }
        }
    }

    fn finish(mut self) -> u64 {
        if self.words > 0 {
            self.page[self.words..].fill(0);
            self.sum.update_page(&self.page);
        }
        self.sum.finish()
    }
}

/// Writes sector contents (`fill_sector(seed, first + i)`) into `data`.
fn fill_sectors(seed: u64, first: u64, data: &mut [u8]) {
    let mut sec = [0u64; SECTOR_WORDS];
    for (i, out) in data.chunks_exact_mut(blk::SECTOR as usize).enumerate() {
        fill_sector(seed, first.wrapping_add(i as u64), &mut sec);
        for (o, w) in out.chunks_exact_mut(8).zip(&sec) {
            o.copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// Whether `data` holds `fill_sector(seed, first + i)` for each sector.
fn check_sectors(seed: u64, first: u64, data: &[u8]) -> bool {
    let mut sec = [0u64; SECTOR_WORDS];
    let mut ok = true;
    for (i, got) in data.chunks_exact(blk::SECTOR as usize).enumerate() {
        fill_sector(seed, first.wrapping_add(i as u64), &mut sec);
        for (g, w) in got.chunks_exact(8).zip(&sec) {
            ok &= g == w.to_le_bytes();
        }
    }
    ok
}

pub fn bad_args(line: &[u8]) {
    put_str("PROBE ERROR bad arguments: ");
    put_bytes(line);
    putc(b'\n');
}

#[allow(clippy::too_many_arguments)]
pub fn blk_command(
    b: &mut Blk,
    name: &[u8],
    args: &Args,
    idx: u64,
    iobuf: u64,
    slots: usize,
    line: &[u8],
) -> Result<(), Error> {
    match name {
        b"blk-info" => {
            let mut id = [0u8; 20];
            let len = b.id(&mut id)?;
            put_str("PROBE BLK idx=");
            put_dec(idx);
            put_str(" capacity=");
            put_dec(b.capacity);
            put_str(" ro=");
            put_dec(u64::from(b.ro));
            put_str(" id=");
            match len {
                Some(n) if n > 0 => {
                    for &c in &id[..n] {
                        putc(if c.is_ascii_graphic() { c } else { b'?' });
                    }
                }
                _ => putc(b'-'),
            }
            putc(b'\n');
        }
        b"blk-write" | b"blk-read" => {
            let (Some(sector), Some(count), Some(seed)) = (args.num(1), args.num(2), args.num(3))
            else {
                bad_args(line);
                return Ok(());
            };
            if !(1..=BLK_COUNT_MAX).contains(&count) {
                bad_args(line);
                return Ok(());
            }
            if name == b"blk-write" {
                let mut st = b.transfer(
                    true,
                    sector,
                    count,
                    iobuf,
                    slots,
                    |first, data| fill_sectors(seed, first, data),
                    |_, _| {},
                )?;
                if st == Status::Ok {
                    st = b.flush()?;
                }
                put_str("PROBE BLK-WRITE idx=");
                put_dec(idx);
                put_str(" status=");
                put_str(st.text());
                putc(b'\n');
            } else {
                let mut stream = PageStream::new();
                let mut same = true;
                let st = b.transfer(
                    false,
                    sector,
                    count,
                    iobuf,
                    slots,
                    |_, _| {},
                    |first, data| {
                        same &= check_sectors(seed, first, data);
                        stream.feed(data);
                    },
                )?;
                put_str("PROBE BLK-READ idx=");
                put_dec(idx);
                put_str(" status=");
                put_str(match st {
                    Status::Ok if same => "ok",
                    Status::Ok => "mismatch",
                    other => other.text(),
                });
                put_str(" checksum=");
                put_hex16(stream.finish());
                putc(b'\n');
            }
        }
        _ => {
            // blk-bench idx mib
            let mib = args.num(1).unwrap_or(0);
            let sectors = mib.saturating_mul(2048);
            if mib == 0 || sectors > b.capacity {
                bad_args(line);
                return Ok(());
            }
            for s in 0..slots as u64 {
                // SAFETY: the I/O buffer is arena RAM reserved for block and
                // rng commands; no request is in flight.
                let data = unsafe {
                    core::slice::from_raw_parts_mut(
                        (iobuf + s * blk::REQ_MAX) as *mut u8,
                        blk::REQ_MAX as usize,
                    )
                };
                fill_sectors(0, s * (blk::REQ_MAX / blk::SECTOR), data);
            }
            let mut status = Status::Ok;
            let mut write_cycles = 0;
            if !b.ro {
                let t0 = time::rdtsc();
                status = b.transfer(true, 0, sectors, iobuf, slots, |_, _| {}, |_, _| {})?;
                if status == Status::Ok {
                    status = b.flush()?;
                }
                write_cycles = time::rdtsc().wrapping_sub(t0);
            }
            let t0 = time::rdtsc();
            let st = b.transfer(false, 0, sectors, iobuf, slots, |_, _| {}, |_, _| {})?;
            let read_cycles = time::rdtsc().wrapping_sub(t0);
            if status == Status::Ok {
                status = st;
            }
            let bytes = mib << 20;
            put_str("PROBE BLK-BENCH idx=");
            put_dec(idx);
            put_str(" write_mib_s=");
            put_rate(time::mib_per_s_x10(bytes, write_cycles));
            put_str(" read_mib_s=");
            put_rate(time::mib_per_s_x10(bytes, read_cycles));
            put_str(" write_cycles=");
            put_dec(write_cycles);
            put_str(" read_cycles=");
            put_dec(read_cycles);
            put_str(" tsc_khz=");
            put_dec(time::tsc_hz() / 1000);
            put_str(" status=");
            put_str(status.text());
            putc(b'\n');
        }
    }
    Ok(())
}

/// Writes a rate given in tenths as `x.y`.
fn put_rate(x10: u64) {
    put_dec(x10 / 10);
    putc(b'.');
    put_dec(x10 % 10);
}

pub fn net_command(
    n: &mut Net,
    name: &[u8],
    args: &Args,
    idx: u64,
    line: &[u8],
) -> Result<(), Error> {
    match name {
        b"net-info" => {
            put_str("PROBE NET idx=");
            put_dec(idx);
            put_str(" mac=");
            for (i, b) in n.mac.iter().enumerate() {
                if i > 0 {
                    putc(b':');
                }
                const HEX: &[u8; 16] = b"0123456789abcdef";
                putc(HEX[usize::from(b >> 4)]);
                putc(HEX[usize::from(b & 15)]);
            }
            putc(b'\n');
        }
        b"net-echo" => {
            let on = match args.words[1] {
                b"on" => true,
                b"off" => false,
                _ => {
                    bad_args(line);
                    return Ok(());
                }
            };
            n.echo = on;
            put_str("PROBE NET-ECHO idx=");
            put_dec(idx);
            put_str(if on { " on\n" } else { " off\n" });
        }
        b"net-send" => {
            let (Some(count), Some(size)) = (args.num(1), args.num(2)) else {
                bad_args(line);
                return Ok(());
            };
            if !(1..=NET_COUNT_MAX).contains(&count)
                || !(net::FRAME_MIN..=net::FRAME_MAX).contains(&size)
            {
                bad_args(line);
                return Ok(());
            }
            let (sent, cycles) = n.send(count, size)?;
            put_str("PROBE NET-SEND idx=");
            put_dec(idx);
            put_str(" sent=");
            put_dec(sent);
            put_str(" cycles=");
            put_dec(cycles);
            putc(b'\n');
        }
        _ => {
            // net-recv: count what has arrived by now.
            while n.poll() {}
            put_str("PROBE NET-RECV idx=");
            put_dec(idx);
            put_str(" frames=");
            put_dec(n.rx_frames);
            put_str(" bytes=");
            put_dec(n.rx_bytes);
            putc(b'\n');
        }
    }
    Ok(())
}
