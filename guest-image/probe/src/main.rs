//! The ksmvm probe guest: a tiny x86-64 kernel booted like Linux (64-bit boot
//! protocol) that fills guest memory with known content at CPL3 and reports
//! over the serial port. See README.md for the protocol and `entry.rs` for
//! the CPL0 part.

#![no_std]
#![no_main]

mod boot;
mod entry;
mod io;
mod mem;
mod paging;
mod params;
mod workload;

use core::sync::atomic::{AtomicBool, Ordering};
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

/// The workload: where the regions are and what they hold.
struct Workload {
    pool: Pool,
    shared: Region,
    unique: Region,
    profile: u64,
    seed: u64,
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
    let pool = Pool::new(&e820, image_end.next_multiple_of(REGION_ALIGN), limit);
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
    let zero = Region {
        first: unique.first + unique.pages,
        pages: params.zero_mib * PAGES_PER_MIB,
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

    let work = Workload {
        pool,
        shared,
        unique,
        profile: params.profile,
        seed: params.seed,
    };
    if params.then == Then::PowerOff {
        put_str("PROBE READY\n");
        io::power_off();
    }
    io::pic_init();
    io::lapic_enable();
    io::uart_enable_rx_irq();
    put_str("PROBE READY\n");
    command_loop(&work)
}

fn putc_nl() {
    io::putc(b'\n');
}

/// Reads lines from the serial input and runs them, sleeping in between.
fn command_loop(work: &Workload) -> ! {
    let mut line = [0u8; LINE_MAX];
    let mut len = 0;
    loop {
        // Drain before sleeping: a byte that arrives after the drain raises
        // IRQ 4, which stays pending in the PIC until `sti; hlt`.
        while let Some(b) = io::try_read() {
            if b == b'\n' || b == b'\r' {
                run_command(work, line[..len].trim_ascii());
                len = 0;
            } else if len < LINE_MAX {
                line[len] = b;
                len += 1;
            }
        }
        io::idle();
    }
}

fn run_command(work: &Workload, cmd: &[u8]) {
    match cmd {
        b"" => {}
        b"ping" => put_str("PROBE PONG\n"),
        b"poweroff" => io::power_off(),
        b"verify" => {
            let (shared_sum, shared_ok) =
                workload::verify(&work.pool, work.shared, DOMAIN_SHARED, work.profile);
            let (unique_sum, unique_ok) =
                workload::verify(&work.pool, work.unique, DOMAIN_UNIQUE, work.seed);
            put_str("PROBE VERIFY shared=");
            put_hex16(shared_sum);
            put_str(" unique=");
            put_hex16(unique_sum);
            put_str(if shared_ok && unique_ok {
                " result=ok\n"
            } else {
                " result=mismatch\n"
            });
        }
        _ => {
            put_str("PROBE ERROR unknown command ");
            put_bytes(cmd);
            putc_nl();
        }
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
