//! The ksmvm probe guest: a tiny x86-64 kernel booted like Linux (64-bit boot
//! protocol) that fills guest memory with known content at CPL3 and reports
//! over the serial port. See README.md for the protocol and `entry.rs` for
//! the CPL0 part.

#![no_std]
#![no_main]

mod balloon;
mod blk;
mod boot;
mod devices;
mod entry;
mod image;
mod io;
mod mem;
mod net;
mod paging;
mod params;
mod rng;
mod time;
mod virtio;
mod workload;

use balloon::MemInfo;
use boot::E820_RAM;
use core::sync::atomic::{AtomicBool, Ordering};
use devices::Devices;
use image::Image;
use io::{put_bytes, put_dec, put_hex, put_hex16, put_str};
use params::{Fault, Then};
use probe_pattern::{DOMAIN_SHARED, DOMAIN_UNIQUE};
use workload::{Pool, Region};

/// Pages per MiB.
const PAGES_PER_MIB: u64 = 256;
/// Workload regions start at a 2 MiB boundary.
const REGION_ALIGN: u64 = 2 << 20;
/// Longest command received on the serial input that is kept.
const LINE_MAX: usize = 64;
/// The virtio DMA arena (rings and buffers): RAM right after the probe
/// image. The workload pool starts at the first 2 MiB boundary past it.
const ARENA_SIZE: u64 = 512 << 10;

/// The workload: where the regions are and what they hold.
struct Workload {
    pool: Pool,
    shared: Region,
    unique: Region,
    zero: Region,
    profile: u64,
    seed: u64,
    /// Bytes of e820 RAM.
    ram_bytes: u64,
    /// Pages at the end of the unique+zero regions reported free
    /// (`free-report`), counted from the end of the zero region down.
    reported_pages: u64,
    /// The replayed memory image (`probe.image=initrd`).
    image: Option<Image>,
}

impl Workload {
    fn mem(&self) -> MemInfo<'_> {
        MemInfo {
            pool: &self.pool,
            free_first: self.zero.first + self.zero.pages,
            ram_bytes: self.ram_bytes,
            reported_pages: self.reported_pages,
        }
    }

    /// Unique pages reported free (they come after the zero region's).
    fn reported_unique(&self) -> u64 {
        self.reported_pages.saturating_sub(self.zero.pages)
    }
}

/// CPL3 entry, called by `user_start` (entry.rs) after zeroing .bss.
/// `bp`: boot_params; `cpuid_ext_edx`: CPUID 0x8000_0001 EDX read at CPL0.
#[no_mangle]
extern "C" fn probe_main(bp: u64, cpuid_ext_edx: u32) -> ! {
    paging::init_idt();
    put_str("PROBE BOOT version=1\n");

    // SAFETY: boot_params was validated at CPL0 and lies at 0x7000, inside
    // the bootstrap mapping.
    let e820 = unsafe { boot::read_e820(bp) };
    let gib_pages = cpuid_ext_edx & (1 << 26) != 0;
    let limit = paging::build_and_load(&e820, gib_pages);

    // SAFETY: the VMM puts the command line in low RAM, which the final
    // tables map.
    let cmdline = unsafe { boot::cmdline(bp) };
    put_str("PROBE CMDLINE ");
    put_bytes(cmdline);
    put_str("\nPROBE E820 count=");
    put_dec(e820.count as u64);
    putc_nl();
    for e in e820.iter() {
        put_str("PROBE E820 addr=");
        put_hex(e.addr);
        put_str(" size=");
        put_hex(e.size);
        put_str(" type=");
        put_dec(u64::from(e.kind));
        putc_nl();
    }
    // SAFETY: the first 2 MiB are always mapped by the final tables.
    let cpus = unsafe { boot::mp_cpu_count() };
    put_str("PROBE CPUS count=");
    put_dec(u64::from(cpus));
    putc_nl();

    let params = match params::parse(cmdline) {
        Ok(p) => p,
        Err(bad) => {
            put_str("PROBE ERROR invalid value for ");
            put_bytes(bad.key);
            put_str(": ");
            put_bytes(bad.value);
            io::fatal_end();
        }
    };

    match params.fault {
        Some(Fault::Emulation) => {
            put_str("PROBE FAULT emulation\n");
            io::fault_emulation();
            io::fatal("fault=emulation: lock cmpxchg16b at CPL0 did not fail");
        }
        Some(Fault::Triple) => {
            put_str("PROBE FAULT triple\n");
            io::fault_triple();
        }
        None => {}
    }

    // Only the address of the linker-script symbol is taken.
    let image_end = core::ptr::addr_of!(entry::__image_end) as u64;
    let arena_start = image_end.next_multiple_of(4096);
    let arena_end = arena_start + ARENA_SIZE;
    let windows = match devices::parse_cmdline(cmdline) {
        Ok(w) => w,
        Err(bad) => {
            put_str("PROBE ERROR invalid value for virtio_mmio.device: ");
            put_bytes(bad);
            io::fatal_end();
        }
    };
    let mut arena = virtio::Arena::new(arena_start, arena_end);
    if windows.count > 0 {
        let in_ram = e820.iter().any(|e| {
            e.kind == E820_RAM
                && e.addr <= arena_start
                && arena_end <= e.addr.saturating_add(e.size)
        });
        if !in_ram {
            io::fatal("no RAM for the virtio arena after the probe image");
        }
        time::calibrate();
    }
    let mut devs = Devices::init(&windows, &mut arena);

    // SAFETY: boot_params is still mapped (the first 2 MiB always are).
    let initrd = unsafe { boot::ramdisk(bp) };
    let image = params
        .image
        .then(|| Image::load(&e820, initrd, arena_end, limit, params.seed));
    // The initrd (a pack or not) is never part of the pool.
    let hole = (initrd.0, initrd.0.saturating_add(initrd.1));
    let pool = Pool::new(&e820, arena_end.next_multiple_of(REGION_ALIGN), limit, hole);
    let mib = [params.shared_mib, params.unique_mib, params.zero_mib];
    let needed_mib = mib.iter().try_fold(0u64, |acc, &m| acc.checked_add(m));
    let available_mib = pool.pages() / PAGES_PER_MIB;
    match needed_mib {
        Some(n) if n <= available_mib => {}
        _ => {
            put_str("PROBE ERROR profile needs ");
            match needed_mib {
                Some(n) => put_dec(n),
                None => put_str("too many"),
            }
            put_str(" MiB, only ");
            put_dec(available_mib);
            put_str(" MiB available");
            io::fatal_end();
        }
    }
    let shared = Region {
        first: 0,
        pages: params.shared_mib * PAGES_PER_MIB,
    };
    let unique = Region {
        first: shared.first + shared.pages,
        pages: params.unique_mib * PAGES_PER_MIB,
    };
    let zero_first = unique.first + unique.pages;
    let zero_mib_pages = params.zero_mib * PAGES_PER_MIB;
    // The image's zero pages follow probe.zero's in the zero region, as many
    // as the pool still holds.
    let image_zero_wanted = image.as_ref().map_or(0, |i| i.header().zero_pages);
    let image_zero = image_zero_wanted.min(pool.pages() - zero_first - zero_mib_pages);
    let zero = Region {
        first: zero_first,
        pages: zero_mib_pages + image_zero,
    };
    put_str("PROBE FILL shared_mib=");
    put_dec(params.shared_mib);
    put_str(" unique_mib=");
    put_dec(params.unique_mib);
    put_str(" zero_mib=");
    put_dec(params.zero_mib);
    putc_nl();
    let shared_sum = workload::fill(&pool, shared, DOMAIN_SHARED, params.profile);
    let unique_sum = workload::fill(&pool, unique, DOMAIN_UNIQUE, params.seed);
    workload::touch_zero(&pool, zero);
    put_str("PROBE CHECKSUM shared=");
    put_hex16(shared_sum);
    put_str(" unique=");
    put_hex16(unique_sum);
    putc_nl();
    if let Some(img) = &image {
        let h = img.header();
        put_str("PROBE IMAGE pages=");
        put_dec(h.pages);
        put_str(" shared=");
        put_dec(h.shared);
        put_str(" unique=");
        put_dec(h.unique());
        put_str(" zero=");
        put_dec(image_zero);
        if image_zero < image_zero_wanted {
            put_str(" zero_wanted=");
            put_dec(image_zero_wanted);
        }
        put_str(" checksum=");
        put_hex16(img.checksum());
        putc_nl();
    }

    let ram_bytes = e820
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| e.size)
        .sum();
    let mut work = Workload {
        pool,
        shared,
        unique,
        zero,
        profile: params.profile,
        seed: params.seed,
        ram_bytes,
        reported_pages: 0,
        image,
    };
    if params.then == Then::PowerOff {
        put_str("PROBE READY\n");
        io::power_off();
    }
    // IRQ 0: the PIT one-shot that bounds sleeps while waiting for a device.
    let pit = if windows.count > 0 { 1 } else { 0 };
    io::pic_init(devs.irq_mask() | pit);
    io::lapic_enable();
    for irq in devs.ioapic_irqs() {
        io::ioapic_route(irq);
    }
    io::uart_enable_rx_irq();
    put_str("PROBE READY\n");
    command_loop(&mut work, &mut devs)
}

fn putc_nl() {
    io::putc(b'\n');
}

/// Reads lines from the serial input and runs them, services the virtio
/// devices, and sleeps until the next IRQ (serial byte, device, PIT).
fn command_loop(work: &mut Workload, devs: &mut Devices) -> ! {
    let mut line = [0u8; LINE_MAX];
    let mut len = 0;
    loop {
        // Drain before sleeping: a byte that arrives after the drain raises
        // IRQ 4, which stays pending in the PIC until `sti; hlt`; so does a
        // device interrupt that follows the service below.
        while let Some(b) = io::try_read() {
            if b == b'\n' || b == b'\r' {
                run_command(work, devs, line[..len].trim_ascii());
                len = 0;
            } else if len < LINE_MAX {
                line[len] = b;
                len += 1;
            }
        }
        if !devs.service(&work.mem()) {
            io::idle();
        }
    }
}

fn run_command(work: &mut Workload, devs: &mut Devices, cmd: &[u8]) {
    let name_len = cmd
        .iter()
        .position(|c| c.is_ascii_whitespace())
        .unwrap_or(cmd.len());
    let (name, rest) = cmd.split_at(name_len);
    if devs.command(name, rest, &work.mem(), cmd) {
        return;
    }
    match cmd {
        b"" => {}
        b"ping" => put_str("PROBE PONG\n"),
        b"poweroff" => io::power_off(),
        b"reset" => {
            put_str("PROBE RESET\n");
            io::reset()
        }
        b"panic" => io::panic_reset(),
        b"verify" => {
            let (shared_sum, shared_ok) =
                workload::verify(&work.pool, work.shared, DOMAIN_SHARED, work.profile);
            let skipped = work.reported_unique();
            let checked = Region {
                first: work.unique.first,
                pages: work.unique.pages - skipped,
            };
            let (unique_sum, unique_ok) =
                workload::verify(&work.pool, checked, DOMAIN_UNIQUE, work.seed);
            put_str("PROBE VERIFY shared=");
            put_hex16(shared_sum);
            put_str(" unique=");
            put_hex16(unique_sum);
            let image_ok = work.image.as_ref().map(Image::verify);
            put_str(if shared_ok && unique_ok && image_ok != Some(false) {
                " result=ok"
            } else {
                " result=mismatch"
            });
            if skipped > 0 {
                put_str(" skipped_pages=");
                put_dec(skipped);
            }
            match image_ok {
                Some(true) => put_str(" image=ok"),
                Some(false) => put_str(" image=mismatch"),
                None => {}
            }
            putc_nl();
        }
        _ if name == b"free-report" => free_report(work, devs, rest, cmd),
        _ if name == b"touch" => touch_free(work, rest, cmd),
        _ => {
            put_str("PROBE ERROR unknown command ");
            put_bytes(cmd);
            putc_nl();
        }
    }
}

/// `touch mib`: dirties the top `mib` MiB of free RAM, the pages the balloon
/// takes first, so that inflating it visibly returns memory to the host.
fn touch_free(work: &Workload, rest: &[u8], cmd: &[u8]) {
    let Some(mib) = params::parse_u64(rest.trim_ascii()) else {
        put_str("PROBE ERROR bad arguments: ");
        put_bytes(cmd);
        putc_nl();
        return;
    };
    let mem = work.mem();
    let free = mem.pool.pages().saturating_sub(mem.free_first);
    let pages = (mib * 256).min(free);
    let top = mem.pool.pages();
    workload::touch_zero(
        &work.pool,
        workload::Region {
            first: top - pages,
            pages,
        },
    );
    put_str("PROBE TOUCH mib=");
    put_dec(mib);
    put_str(" pages=");
    put_dec(pages);
    putc_nl();
}

/// `free-report mib`: reports the next `mib` MiB of the unique+zero regions,
/// from the end of the zero region down, as free through the balloon.
fn free_report(work: &mut Workload, devs: &mut Devices, rest: &[u8], cmd: &[u8]) {
    let mib = match params::parse_u64(rest.trim_ascii()) {
        Some(m) if m > 0 => m,
        _ => {
            put_str("PROBE ERROR bad arguments: ");
            put_bytes(cmd);
            putc_nl();
            return;
        }
    };
    let answer = |status: &str| {
        put_str("PROBE FREE-REPORT mib=");
        put_dec(mib);
        put_str(" status=");
        put_str(status);
        putc_nl();
    };
    if !devs.can_report() {
        answer("unsupp");
        return;
    }
    let reportable = work.unique.pages + work.zero.pages;
    let left = reportable - work.reported_pages;
    let pages = mib.saturating_mul(PAGES_PER_MIB);
    if pages > left {
        put_str("PROBE ERROR free-report: only ");
        put_dec(left / PAGES_PER_MIB);
        put_str(" MiB of the unique and zero regions left to report\n");
        return;
    }
    let end = work.zero.first + work.zero.pages - work.reported_pages;
    let region = Region {
        first: end - pages,
        pages,
    };
    // From here on the probe does not rely on these pages' content, even if
    // the report fails half-way.
    work.reported_pages += pages;
    if let Ok(true) = devs.free_report(work.pool.spans(region)) {
        answer("ok");
    }
}

/// Set once a fatal report (exception or panic) has begun.
static DYING: AtomicBool = AtomicBool::new(false);

/// Starts a fatal report; a second one (the report itself faulted, e.g.
/// because port I/O does not work) triple-faults rather than loop.
fn begin_fatal_report() {
    if DYING.swap(true, Ordering::Relaxed) {
        io::fault_triple();
    }
}

/// Reached (at CPL3, on the fault stack) when CPL3 code raised an exception.
#[no_mangle]
extern "C" fn user_exception(
    vector: u64,
    error: u64,
    rip: u64,
    cr2: u64,
    cs: u64,
    rflags: u64,
) -> ! {
    begin_fatal_report();
    put_str("PROBE ERROR exception vector=");
    put_dec(vector);
    put_str(" error=");
    put_hex(error);
    put_str(" rip=");
    put_hex(rip);
    put_str(" cr2=");
    put_hex(cr2);
    put_str(" cs=");
    put_hex(cs);
    put_str(" rflags=");
    put_hex(rflags);
    io::fatal_end()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    begin_fatal_report();
    put_str("PROBE ERROR panic: ");
    let _ = write!(io::Serial, "{}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(io::Serial, " at {}:{}", loc.file(), loc.line());
    }
    io::fatal_end()
}
