//! Hostile modes: what a malicious or broken guest does to the VMM, so that
//! the host's tests can bound what it costs (tests/hostile.rs). Each
//! command drives a device the way no honest driver would and reports what
//! came back; none of them trusts the device to be quick.
//!
//! * `blk-alias`: a block queue full of huge read chains whose data
//!   descriptors all alias one guest buffer.
//! * `notify-storm`: QueueNotify as fast as the vCPU can write it, with
//!   nothing on the queue.
//! * `net-flood`: transmit frames back to back, with forged or own source
//!   MACs.
//! * `blk-seq`: sequence-numbered writes with a FLUSH every so often (not an
//!   attack: what a crash-consistency test needs to know is durable).
//! * `serial-flood`: output that looks like the host's own log lines.

use super::alias::blk_alias;
use super::commands::bad_args;
use super::{print_failure, Args, Device, Devices, Driver, Kind};
use crate::balloon::MemInfo;
use crate::blk::{self, Status};
use crate::io::{put_bytes, put_dec, put_str, putc};
use crate::net;
use crate::time;
use crate::virtio::Error;
use probe_pattern::{seq_sector, SECTOR_WORDS};

/// Seconds `net-flood` waits for the device to take a transmit buffer.
const FLOOD_TIMEOUT_S: u64 = 30;
/// Default frame size of `net-flood` (a minimal Ethernet frame).
const FLOOD_SIZE: u64 = 60;
/// Most notifications one `notify-storm` writes.
const STORM_MAX: u64 = 1 << 40;
/// Most blocks one `blk-seq` writes (8 GiB).
const SEQ_COUNT_MAX: u64 = 1 << 24;
/// Most bytes one `serial-flood` prints.
const SERIAL_FLOOD_MAX: u64 = 1 << 40;

/// Whether `name` is one of the hostile commands.
pub fn is_command(name: &[u8]) -> bool {
    matches!(
        name,
        b"blk-alias" | b"notify-storm" | b"net-flood" | b"blk-seq" | b"serial-flood"
    )
}

/// Runs hostile command `name` (see `is_command`).
pub fn run(devs: &mut Devices, name: &[u8], args: &Args, mem: &MemInfo, line: &[u8]) {
    match name {
        b"blk-alias" => blk_alias(devs, args, mem, line),
        b"notify-storm" => notify_storm(devs, args, line),
        b"net-flood" => net_flood(devs, args, line),
        b"blk-seq" => blk_seq(devs, args, line),
        _ => serial_flood(args, line),
    }
}

/// Milliseconds since TSC value `t0`.
fn ms_since(t0: u64) -> u64 {
    cycles_ms(time::rdtsc().wrapping_sub(t0))
}

pub fn cycles_ms(cycles: u64) -> u64 {
    (u128::from(cycles) * 1000 / u128::from(time::timeout_hz())) as u64
}

/// Device `idx` of `kind`, or None after printing why there is none (or
/// why it is unusable).
pub fn target(devs: &mut Devices, kind: Kind, idx: u64) -> Option<&mut Device> {
    let Some(dev) = devs.find(kind, idx) else {
        put_str("PROBE ERROR no ");
        put_str(kind.name());
        put_str(" device idx=");
        put_dec(idx);
        putc(b'\n');
        return None;
    };
    if let Driver::Failed(_, e) = dev.driver {
        print_failure(kind, idx as usize, e);
        return None;
    }
    Some(dev)
}

/// Marks `dev` failed after `e` (the probe no longer touches it).
pub fn fail(dev: &mut Device, kind: Kind, idx: u64, e: Error) {
    print_failure(kind, idx as usize, e);
    dev.driver = Driver::Failed(kind, e);
}

/// The probe's name of a device kind, as in `PROBE VIRTIO type=`.
fn kind_of(word: &[u8]) -> Option<Kind> {
    [Kind::Block, Kind::Net, Kind::Balloon, Kind::Rng]
        .into_iter()
        .find(|k| k.name().as_bytes() == word)
}

/// `notify-storm <type> <idx> <count> [<max_ms>]`: writes QueueNotify of the
/// device's request queue (block, rng: 0; net: 1, transmit; balloon: 0,
/// inflate) `count` times back to back with nothing new on it, or until
/// `max_ms` have passed.
fn notify_storm(devs: &mut Devices, args: &Args, line: &[u8]) {
    let kind = (args.count >= 3).then(|| kind_of(args.words[0])).flatten();
    let max_ms = if args.count == 4 {
        args.num(3)
    } else {
        Some(u64::MAX)
    };
    let (Some(kind), Some(idx), Some(count), Some(max_ms)) =
        (kind, args.num(1), args.num(2), max_ms)
    else {
        return bad_args(line);
    };
    if !(1..=STORM_MAX).contains(&count) || args.count > 4 {
        return bad_args(line);
    }
    let Some(dev) = target(devs, kind, idx) else {
        return;
    };
    let (mmio, queue) = match &dev.driver {
        Driver::Blk(b) => (&b.mmio, 0),
        Driver::Net(n) => (&n.mmio, 1),
        Driver::Balloon(b) => (&b.mmio, 0),
        Driver::Rng(r) => (&r.mmio, 0),
        _ => return,
    };
    let hz = time::timeout_hz();
    let limit = u128::from(max_ms) * u128::from(hz) / 1000;
    let t0 = time::rdtsc();
    let mut sent = 0;
    while sent < count {
        mmio.notify(queue);
        sent += 1;
        if sent % 1024 == 0 && u128::from(time::rdtsc().wrapping_sub(t0)) >= limit {
            break;
        }
    }
    let ms = ms_since(t0);
    put_str("PROBE NOTIFY-STORM type=");
    put_str(kind.name());
    put_str(" idx=");
    put_dec(idx);
    put_str(" queue=");
    put_dec(u64::from(queue));
    put_str(" count=");
    put_dec(sent);
    put_str(" ms=");
    put_dec(ms);
    putc(b'\n');
}

/// `net-flood <idx> <count> forge|own [<size>]`: sends `count` frames as
/// `net-send` does, back to back, with a made-up source MAC per frame
/// (`forge`: 02:66:6f and the frame's sequence number) or the device's own.
fn net_flood(devs: &mut Devices, args: &Args, line: &[u8]) {
    let forge = match (args.count >= 3).then(|| args.words[2]) {
        Some(b"forge") => true,
        Some(b"own") => false,
        _ => return bad_args(line),
    };
    let size = if args.count == 4 {
        args.num(3)
    } else {
        Some(FLOOD_SIZE)
    };
    let (Some(idx), Some(count), Some(size)) = (args.num(0), args.num(1), size) else {
        return bad_args(line);
    };
    if args.count > 4
        || !(1..=super::commands::NET_COUNT_MAX).contains(&count)
        || !(net::FRAME_MIN..=net::FRAME_MAX).contains(&size)
    {
        return bad_args(line);
    }
    let Some(dev) = target(devs, Kind::Net, idx) else {
        return;
    };
    let Driver::Net(n) = &mut dev.driver else {
        return;
    };
    let t0 = time::rdtsc();
    match n.send_from(count, size, forge, FLOOD_TIMEOUT_S) {
        Ok((sent, cycles)) => {
            let ms = ms_since(t0);
            put_str("PROBE NET-FLOOD idx=");
            put_dec(idx);
            put_str(if forge { " mode=forge" } else { " mode=own" });
            put_str(" sent=");
            put_dec(sent);
            put_str(" ms=");
            put_dec(ms);
            put_str(" cycles=");
            put_dec(cycles);
            putc(b'\n');
        }
        Err(e) => fail(dev, Kind::Net, idx, e),
    }
}

/// Writes `blk-seq` blocks `first..` into `data` (one sector each).
fn fill_seq(seed: u64, first: u64, data: &mut [u8]) {
    let mut sec = [0u64; SECTOR_WORDS];
    for (i, out) in data.chunks_exact_mut(blk::SECTOR as usize).enumerate() {
        seq_sector(seed, first + i as u64, &mut sec);
        for (o, w) in out.chunks_exact_mut(8).zip(&sec) {
            o.copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// `blk-seq <idx> <count> <every> [<seed>]`: writes blocks `0..count`
/// (block `i`: sector `i`, `probe_pattern::seq_sector(seed, i)`) in batches
/// of `every`, each batch followed by a FLUSH; after each acknowledged
/// FLUSH prints `PROBE BLK-SEQ idx=<i> flushed=<blocks>` (blocks
/// `0..blocks` are durable), at the end `PROBE BLK-SEQ-END idx=<i>
/// written=<n> flushed=<n> status=ok|ioerr|unsupp`.
fn blk_seq(devs: &mut Devices, args: &Args, line: &[u8]) {
    let seed = if args.count == 4 {
        args.num(3)
    } else {
        Some(0)
    };
    let (Some(idx), Some(count), Some(every), Some(seed)) =
        (args.num(0), args.num(1), args.num(2), seed)
    else {
        return bad_args(line);
    };
    if args.count < 3 || !(1..=SEQ_COUNT_MAX).contains(&count) || every == 0 {
        return bad_args(line);
    }
    let (iobuf, slots) = (devs.iobuf, devs.iobuf_slots);
    if slots == 0 {
        put_str("PROBE ERROR no I/O buffer\n");
        return;
    }
    let Some(dev) = target(devs, Kind::Block, idx) else {
        return;
    };
    let Driver::Blk(b) = &mut dev.driver else {
        return;
    };
    let (mut written, mut flushed, mut status) = (0, 0, Status::Ok);
    while written < count && status == Status::Ok {
        let n = every.min(count - written);
        let fill = |first, data: &mut [u8]| fill_seq(seed, first, data);
        status = match b.transfer(true, written, n, iobuf, slots, fill, |_, _| {}) {
            Ok(st) => st,
            Err(e) => return fail(dev, Kind::Block, idx, e),
        };
        if status != Status::Ok {
            break;
        }
        written += n;
        status = match b.flush() {
            Ok(st) => st,
            Err(e) => return fail(dev, Kind::Block, idx, e),
        };
        if status == Status::Ok {
            flushed = written;
            put_str("PROBE BLK-SEQ idx=");
            put_dec(idx);
            put_str(" flushed=");
            put_dec(flushed);
            putc(b'\n');
        }
    }
    put_str("PROBE BLK-SEQ-END idx=");
    put_dec(idx);
    put_str(" written=");
    put_dec(written);
    put_str(" flushed=");
    put_dec(flushed);
    put_str(" status=");
    put_str(status.text());
    putc(b'\n');
}

/// Prints `line` if it fits in `*left` bytes, else its first `*left - 1`
/// bytes and a newline; counts what it printed.
fn emit(line: &[u8], left: &mut u64) {
    let n = (line.len() as u64).min(*left);
    if n == 0 {
        return;
    }
    if n == line.len() as u64 {
        put_bytes(line);
    } else {
        put_bytes(&line[..(n - 1) as usize]);
        putc(b'\n');
    }
    *left -= n;
}

/// Appends `s` to `buf` at `*len` (cut at the buffer's end).
fn push(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    let n = s.len().min(buf.len() - *len);
    buf[*len..*len + n].copy_from_slice(&s[..n]);
    *len += n;
}

fn push_dec(buf: &mut [u8], len: &mut usize, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    push(buf, len, &digits[i..]);
}

/// `serial-flood <bytes>`: prints exactly `bytes` bytes of lines (the last
/// one cut, newline kept), cycling through six kinds: a journald priority
/// prefix (`<3>ksmvm: error: ...`), two of ksmvm's own log lines verbatim
/// (`ksmvm: error: ...`, `ksmvm: warn: ...`), `<0>` (emergency), ANSI
/// escape sequences, and 200-byte filler; then `PROBE SERIAL-FLOOD
/// bytes=<n> lines=<n> ms=<ms>`. No flood line starts with `PROBE`.
fn serial_flood(args: &Args, line: &[u8]) {
    let Some(bytes) = args
        .num(0)
        .filter(|b| args.count == 1 && (1..=SERIAL_FLOOD_MAX).contains(b))
    else {
        return bad_args(line);
    };
    const KINDS: [&[u8]; 6] = [
        b"<3>ksmvm: error: serial-flood n=",
        b"ksmvm: error: the guest did not shut down within 2 s; stopping the VM n=",
        b"ksmvm: warn: virtio-blk: request without a 16-byte header n=",
        b"<0>serial-flood emergency n=",
        b"\x1b[2J\x1b[H\x1b[31mserial-flood escape sequences\x1b[0m\r n=",
        b"serial-flood filler n=",
    ];
    let t0 = time::rdtsc();
    let (mut left, mut lines) = (bytes, 0u64);
    while left > 0 {
        let mut buf = [0u8; 256];
        let mut len = 0;
        let kind = (lines % KINDS.len() as u64) as usize;
        push(&mut buf, &mut len, KINDS[kind]);
        push_dec(&mut buf, &mut len, lines);
        if kind == 5 {
            while len < 199 {
                push(&mut buf, &mut len, b"x");
            }
        }
        push(&mut buf, &mut len, b"\n");
        emit(&buf[..len], &mut left);
        lines += 1;
    }
    let ms = ms_since(t0);
    put_str("PROBE SERIAL-FLOOD bytes=");
    put_dec(bytes);
    put_str(" lines=");
    put_dec(lines);
    put_str(" ms=");
    put_dec(ms);
    putc(b'\n');
}
