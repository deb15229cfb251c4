//! The virtio-mmio devices named on the command line
//! (`virtio_mmio.device=<size>@<addr>:<irq>`), their set-up, their service
//! after every wake-up, and the serial commands that drive them.

mod alias;
mod commands;
mod hostile;

use crate::balloon::{Balloon, MemInfo};
use crate::blk::{self, Blk};
use crate::io::{put_dec, put_hex, put_str, putc};
use crate::net::Net;
use crate::paging::{MMIO_GAP_END, MMIO_GAP_START};
use crate::params::parse_u64;
use crate::rng::Rng;
use crate::virtio::{self, Arena, Error, Mmio};
use commands::{bad_args, blk_command, net_command};

/// Most devices the probe takes from the command line.
pub const MAX_DEVICES: usize = 24;
/// Bytes of the I/O buffer shared by block and rng commands (four 64 KiB
/// request slots; fewer if the arena runs short).
const IOBUF_MAX: u64 = 4 * blk::REQ_MAX;
/// Most bytes one `rng` command reads.
const RNG_MAX: u64 = 64 << 20;

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
    words: [&'a [u8]; 6],
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
            words: [&[]; 6],
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
        if hostile::is_command(name) {
            if too_many {
                bad_args(line);
            } else {
                hostile::run(self, name, &args, mem, line);
            }
            return true;
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
