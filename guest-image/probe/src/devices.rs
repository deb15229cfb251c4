//! The virtio-mmio devices named on the command line
//! (`virtio_mmio.device=<size>@<addr>:<irq>`), their set-up, their service
//! after every wake-up, and the serial commands that drive them.

use crate::balloon::{Balloon, MemInfo};
use crate::blk::{self, Blk, Status};
use crate::io::{put_bytes, put_dec, put_hex, put_hex16, put_str, putc};
use crate::net::{self, Net};
use crate::paging::{MMIO_GAP_END, MMIO_GAP_START};
use crate::params::parse_u64;
use crate::rng::Rng;
use crate::time;
use crate::virtio::{self, Arena, Error, Mmio};
use probe_pattern::{fill_sector, Checksum, PAGE_WORDS, SECTOR_WORDS};

/// Most devices the probe takes from the command line.
pub const MAX_DEVICES: usize = 24;
/// Bytes of the I/O buffer shared by block and rng commands (four 64 KiB
/// request slots; fewer if the arena runs short).
const IOBUF_MAX: u64 = 4 * blk::REQ_MAX;
/// Most sectors one `blk-write`/`blk-read` moves (8 GiB).
const BLK_COUNT_MAX: u64 = 1 << 24;
/// Most bytes one `rng` command reads.
const RNG_MAX: u64 = 64 << 20;
/// Most frames one `net-send` sends.
const NET_COUNT_MAX: u64 = 1 << 32;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block,
    Net,
    Balloon,
    Rng,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Block => "block",
            Kind::Net => "net",
            Kind::Balloon => "balloon",
            Kind::Rng => "rng",
        }
    }
}

enum Driver {
    /// No (modern) virtio device in the window, or device ID 0.
    None,
    /// A device type the probe has no driver for.
    Unknown,
    Blk(Blk),
    Net(Net),
    Balloon(Balloon),
    Rng(Rng),
    /// Set-up failed or the device stopped answering.
    Failed(Kind, Error),
}

impl Driver {
    fn kind(&self) -> Option<Kind> {
        match self {
            Driver::None | Driver::Unknown => None,
            Driver::Blk(_) => Some(Kind::Block),
            Driver::Net(_) => Some(Kind::Net),
            Driver::Balloon(_) => Some(Kind::Balloon),
            Driver::Rng(_) => Some(Kind::Rng),
            Driver::Failed(k, _) => Some(*k),
        }
    }
}

struct Device {
    irq: u32,
    driver: Driver,
}

/// One `virtio_mmio.device=` entry.
#[derive(Clone, Copy, Default)]
pub struct Window {
    pub addr: u64,
    pub irq: u32,
}

/// The windows named on the command line, in order.
pub struct Windows {
    pub list: [Window; MAX_DEVICES],
    pub count: usize,
}

/// Linux's memparse: a number with an optional K/M/G suffix.
fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_u64(num)?.checked_mul(1 << shift)
}

/// Parses `<size>@<addr>:<irq>[:<id>]`: a window of at least 512 bytes,
/// 512-byte aligned, inside the MMIO gap.
fn parse_window(v: &[u8]) -> Option<Window> {
    let at = v.iter().position(|&c| c == b'@')?;
    let size = parse_size(&v[..at])?;
    let rest = &v[at + 1..];
    let colon = rest.iter().position(|&c| c == b':')?;
    let addr = parse_u64(&rest[..colon])?;
    let irq_s = &rest[colon + 1..];
    let irq_s = &irq_s[..irq_s.iter().position(|&c| c == b':').unwrap_or(irq_s.len())];
    let irq = u32::try_from(parse_u64(irq_s)?).ok()?;
    let ok = size >= 0x200
        && addr % 0x200 == 0
        && addr >= MMIO_GAP_START
        && addr.checked_add(size)? <= MMIO_GAP_END;
    ok.then_some(Window { addr, irq })
}

/// Every `virtio_mmio.device=` word of the command line, or the first bad
/// value (also when there are more than MAX_DEVICES).
pub fn parse_cmdline(cmdline: &[u8]) -> Result<Windows, &[u8]> {
    let mut w = Windows {
        list: [Window::default(); MAX_DEVICES],
        count: 0,
    };
    for word in cmdline.split(|c| c.is_ascii_whitespace()) {
        let Some(value) = word.strip_prefix(b"virtio_mmio.device=") else {
            continue;
        };
        match parse_window(value) {
            Some(win) if w.count < MAX_DEVICES => {
                w.list[w.count] = win;
                w.count += 1;
            }
            _ => return Err(value),
        }
    }
    Ok(w)
}

pub struct Devices {
    list: [Device; MAX_DEVICES],
    count: usize,
    /// The shared block/rng I/O buffer and its 64 KiB slots (0: none).
    iobuf: u64,
    iobuf_slots: usize,
    /// The balloon's first stats buffer has been posted.
    balloon_started: bool,
}

const NO_DEVICE: Device = Device {
    irq: 0,
    driver: Driver::None,
};

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

fn print_failure(kind: Kind, idx: usize, e: Error) {
    put_str("PROBE ERROR ");
    put_str(kind.name());
    put_str(" idx=");
    put_dec(idx as u64);
    put_str(": ");
    put_str(e.text());
    putc(b'\n');
}

/// A command's arguments: the words after its name.
struct Args<'a> {
    words: [&'a [u8]; 4],
    count: usize,
}

impl<'a> Args<'a> {
    fn num(&self, i: usize) -> Option<u64> {
        (i < self.count).then(|| parse_u64(self.words[i])).flatten()
    }
}

impl Devices {
    /// Probes and brings up every window, printing one `PROBE VIRTIO` line
    /// each (and a `PROBE ERROR` line for a device that failed to come up).
    pub fn init(windows: &Windows, arena: &mut Arena) -> Devices {
        let mut devs = Devices {
            list: [NO_DEVICE; MAX_DEVICES],
            count: windows.count,
            iobuf: 0,
            iobuf_slots: 0,
            balloon_started: false,
        };
        let mut nets = 0u8;
        for (i, w) in windows.list[..windows.count].iter().enumerate() {
            // SAFETY: `parse_window` checked that the window lies in the
            // MMIO gap, which the page tables map (uncached, user).
            let mmio = unsafe { Mmio::new(w.addr) };
            let modern = mmio.magic_ok() && mmio.version() == 2;
            let (driver, err) = match if modern { mmio.device_id() } else { 0 } {
                0 => (Driver::None, None),
                virtio::ID_BLOCK => match Blk::init(mmio, arena) {
                    Ok(d) => (Driver::Blk(d), None),
                    Err((_, e)) => (Driver::Failed(Kind::Block, e), Some(e)),
                },
                virtio::ID_NET => {
                    nets = nets.wrapping_add(1);
                    match Net::init(mmio, arena, nets - 1) {
                        Ok(d) => (Driver::Net(d), None),
                        Err((_, e)) => (Driver::Failed(Kind::Net, e), Some(e)),
                    }
                }
                virtio::ID_BALLOON => match Balloon::init(mmio, arena) {
                    Ok(d) => (Driver::Balloon(d), None),
                    Err((_, e)) => (Driver::Failed(Kind::Balloon, e), Some(e)),
                },
                virtio::ID_RNG => match Rng::init(mmio, arena) {
                    Ok(d) => (Driver::Rng(d), None),
                    Err((_, e)) => (Driver::Failed(Kind::Rng, e), Some(e)),
                },
                _ => (Driver::Unknown, None),
            };
            put_str("PROBE VIRTIO idx=");
            put_dec(i as u64);
            put_str(" addr=");
            put_hex(w.addr);
            put_str(" irq=");
            put_dec(u64::from(w.irq));
            put_str(" type=");
            put_str(match (&driver, driver.kind()) {
                (Driver::Unknown, _) => "unknown",
                (_, Some(k)) => k.name(),
                (_, None) => "none",
            });
            putc(b'\n');
            if let (Some(e), Some(k)) = (err, driver.kind()) {
                print_failure(k, devs.index_of(i, k), e);
            }
            devs.list[i] = Device { irq: w.irq, driver };
        }
        let needs_iobuf = devs.list[..devs.count]
            .iter()
            .any(|d| matches!(d.driver, Driver::Blk(_) | Driver::Rng(_)));
        if needs_iobuf {
            let slots = (arena.left().min(IOBUF_MAX) / blk::REQ_MAX) as usize;
            if let Ok(buf) = arena.alloc(slots as u64 * blk::REQ_MAX) {
                devs.iobuf = buf;
                devs.iobuf_slots = slots;
            }
        }
        devs
    }

    /// IRQs 16..23 (IOAPIC only): the devices interrupt through there.
    pub fn ioapic_irqs(&self) -> impl Iterator<Item = u32> + '_ {
        self.list[..self.count]
            .iter()
            .map(|d| d.irq)
            .filter(|irq| (16..24).contains(irq))
    }

    /// The PIC lines (bits 0..15) the devices interrupt on.
    pub fn irq_mask(&self) -> u16 {
        self.list[..self.count]
            .iter()
            .filter(|d| d.irq < 16)
            .fold(0, |m, d| m | 1 << d.irq)
    }

    /// The index of device `i` among the devices of its kind.
    fn index_of(&self, i: usize, kind: Kind) -> usize {
        self.list[..i]
            .iter()
            .filter(|d| d.driver.kind() == Some(kind))
            .count()
    }

    /// Device `idx` of `kind`.
    fn find(&mut self, kind: Kind, idx: u64) -> Option<&mut Device> {
        self.list[..self.count]
            .iter_mut()
            .filter(|d| d.driver.kind() == Some(kind))
            .nth(usize::try_from(idx).ok()?)
    }

    /// Services every device after a wake-up: acknowledges interrupts,
    /// handles received frames, follows the balloon target and answers
    /// stats requests. Returns true if work is left (do not sleep).
    pub fn service(&mut self, mem: &MemInfo) -> bool {
        let mut more = false;
        let mut balloon_idx = 0;
        for dev in &mut self.list[..self.count] {
            match &mut dev.driver {
                Driver::Net(n) => {
                    n.mmio.ack_interrupt();
                    more |= n.poll();
                }
                Driver::Balloon(b) => {
                    b.mmio.ack_interrupt();
                    if !self.balloon_started {
                        b.start(mem);
                    }
                    if let Err(e) = b.service(mem) {
                        print_failure(Kind::Balloon, balloon_idx, e);
                        dev.driver = Driver::Failed(Kind::Balloon, e);
                    }
                    balloon_idx += 1;
                }
                Driver::Failed(Kind::Balloon, _) => balloon_idx += 1,
                _ => {}
            }
        }
        self.balloon_started = true;
        more
    }

    /// Runs a virtio command. Returns false if `name` is not one.
    pub fn command(&mut self, name: &[u8], rest: &[u8], mem: &MemInfo, line: &[u8]) -> bool {
        let mut args = Args {
            words: [&[]; 4],
            count: 0,
        };
        let mut too_many = false;
        for w in rest
            .split(|c| c.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
        {
            if args.count == args.words.len() {
                too_many = true;
            } else {
                args.words[args.count] = w;
                args.count += 1;
            }
        }
        let (kind, nargs) = match name {
            b"blk-info" => (Kind::Block, 1),
            b"blk-write" | b"blk-read" => (Kind::Block, 4),
            b"blk-bench" => (Kind::Block, 2),
            b"net-info" | b"net-recv" => (Kind::Net, 1),
            b"net-echo" => (Kind::Net, 2),
            b"net-send" => (Kind::Net, 3),
            b"rng" => (Kind::Rng, 2),
            b"balloon" => (Kind::Balloon, 0),
            _ => return false,
        };
        if too_many || args.count != nargs || (nargs > 0 && args.num(0).is_none()) {
            bad_args(line);
            return true;
        }
        let idx = if nargs > 0 {
            args.num(0).unwrap_or(0)
        } else {
            0
        };
        let (iobuf, slots) = (self.iobuf, self.iobuf_slots);
        let Some(dev) = self.find(kind, idx) else {
            put_str("PROBE ERROR no ");
            put_str(kind.name());
            put_str(" device idx=");
            put_dec(idx);
            putc(b'\n');
            return true;
        };
        let result = match &mut dev.driver {
            Driver::Failed(_, e) => Err(*e),
            Driver::Blk(b) => {
                if slots == 0 && name != b"blk-info" {
                    put_str("PROBE ERROR no I/O buffer\n");
                    return true;
                }
                blk_command(b, name, &args, idx, iobuf, slots, line)
            }
            Driver::Net(n) => net_command(n, name, &args, idx, line),
            Driver::Rng(r) => match args.num(1) {
                Some(bytes) if (1..=RNG_MAX).contains(&bytes) && slots > 0 => r
                    .read(bytes, iobuf, slots as u64 * blk::REQ_MAX)
                    .map(|(got, distinct)| {
                        put_str("PROBE RNG idx=");
                        put_dec(idx);
                        put_str(" bytes=");
                        put_dec(got);
                        put_str(" distinct=");
                        put_dec(u64::from(distinct));
                        putc(b'\n');
                    }),
                _ => {
                    bad_args(line);
                    Ok(())
                }
            },
            Driver::Balloon(b) => b.adjust(mem).map(|()| {
                put_str("PROBE BALLOON target_pages=");
                put_dec(b.target());
                put_str(" actual=");
                put_dec(b.actual);
                putc(b'\n');
            }),
            Driver::None | Driver::Unknown => Ok(()),
        };
        if let Err(e) = result {
            print_failure(kind, idx as usize, e);
            dev.driver = Driver::Failed(kind, e);
        }
        true
    }

    /// Whether a balloon negotiated free page reporting.
    pub fn can_report(&mut self) -> bool {
        self.reporting_balloon().is_some()
    }

    /// The first balloon, if it negotiated free page reporting.
    fn reporting_balloon(&mut self) -> Option<&mut Device> {
        self.list[..self.count]
            .iter_mut()
            .find(|d| matches!(&d.driver, Driver::Balloon(b) if b.can_report()))
    }

    /// `free-report`: reports `spans` through the first balloon. Returns
    /// false if no balloon negotiated free page reporting.
    pub fn free_report(&mut self, spans: impl Iterator<Item = (u64, u64)>) -> Result<bool, ()> {
        let Some(dev) = self.reporting_balloon() else {
            return Ok(false);
        };
        let Driver::Balloon(b) = &mut dev.driver else {
            return Ok(false);
        };
        if let Err(e) = b.report(spans) {
            print_failure(Kind::Balloon, 0, e);
            dev.driver = Driver::Failed(Kind::Balloon, e);
            return Err(());
        }
        Ok(true)
    }
}

fn bad_args(line: &[u8]) {
    put_str("PROBE ERROR bad arguments: ");
    put_bytes(line);
    putc(b'\n');
}

#[allow(clippy::too_many_arguments)]
fn blk_command(
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

fn net_command(n: &mut Net, name: &[u8], args: &Args, idx: u64, line: &[u8]) -> Result<(), Error> {
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
