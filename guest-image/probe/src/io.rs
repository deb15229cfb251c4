//! Port I/O, the 16550 UART, the gates into CPL0 and power-off. All of this
//! runs at CPL3 with RFLAGS.IOPL=3, so `in`/`out` are allowed.

use crate::entry::{probe_service, SYS_FAULT_EMULATION, SYS_FAULT_TRIPLE, SYS_IDLE, SYS_SET_CR3};
use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

/// The PIC has been programmed: sleeping until an IRQ is safe (before,
/// an IRQ would arrive on the PIC's reset vectors, i.e. as an exception).
static IRQS_READY: AtomicBool = AtomicBool::new(false);

const COM1: u16 = 0x3f8;
const UART_RBR_THR: u16 = COM1;
const UART_IER: u16 = COM1 + 1;
const UART_MCR: u16 = COM1 + 4;
const UART_LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
/// ksmvm's ACPI PM1a control register (FADT PM1a_CNT_BLK) and the S5
/// value: SLP_TYP 5 (the DSDT's `_S5_`) << 10 | SLP_EN.
const ACPI_PM1A_CNT: u16 = 0x604;
const ACPI_S5: u16 = (5 << 10) | (1 << 13);
/// pvpanic port and its PANICKED event.
const PVPANIC: u16 = 0x505;
const PVPANIC_PANICKED: u8 = 1;

/// Writes `val` to I/O port `port`.
#[inline(always)]
pub fn outb(port: u16, val: u8) {
    // SAFETY: the probe runs with IOPL=3 and only touches the legacy devices
    // it drives (UART, PIC, i8042); `out` accesses no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

/// Writes the 16-bit `val` to I/O port `port`.
#[inline(always)]
pub fn outw(port: u16, val: u16) {
    // SAFETY: as for `outb`: a port of a device the probe drives; `out`
    // accesses no memory.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads I/O port `port`.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let val: u8;
    // SAFETY: as for `outb`; `in` accesses no memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") val, options(nomem, nostack, preserves_flags))
    }
    val
}

/// Writes one byte to the UART, waiting for the transmitter first. Never
/// inlined (nor are the other printers): every byte is a VM exit anyway,
/// and inlined copies at every call site would not fit the image's room
/// below the virtio arena (linker.ld).
#[inline(never)]
pub fn putc(b: u8) {
    while inb(UART_LSR) & LSR_THR_EMPTY == 0 {
        core::hint::spin_loop();
    }
    outb(UART_RBR_THR, b);
}

/// Writes bytes verbatim.
#[inline(never)]
pub fn put_bytes(bytes: &[u8]) {
    for &b in bytes {
        putc(b);
    }
}

/// Writes a string verbatim.
#[inline(never)]
pub fn put_str(s: &str) {
    put_bytes(s.as_bytes());
}

/// Writes `v` in decimal.
#[inline(never)]
pub fn put_dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put_bytes(&buf[i..]);
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `v` as `0x` and lowercase hex digits without padding.
pub fn put_hex(v: u64) {
    put_str("0x");
    let digits = if v == 0 {
        1
    } else {
        16 - v.leading_zeros() as usize / 4
    };
    for i in (0..digits).rev() {
        putc(HEX[((v >> (i * 4)) & 0xf) as usize]);
    }
}

/// Writes `v` as `0x` and exactly 16 lowercase hex digits.
pub fn put_hex16(v: u64) {
    put_str("0x");
    for i in (0..16).rev() {
        putc(HEX[((v >> (i * 4)) & 0xf) as usize]);
    }
}

/// `core::fmt` sink on the UART (used for panic messages only).
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        put_str(s);
        Ok(())
    }
}

/// Returns the next received byte, if any.
pub fn try_read() -> Option<u8> {
    if inb(UART_LSR) & LSR_DATA_READY != 0 {
        Some(inb(UART_RBR_THR))
    } else {
        None
    }
}

/// Makes a received byte raise IRQ 4: IER.RDA, and MCR.OUT2 (gates the IRQ
/// line on real 16550s) with DTR|RTS.
pub fn uart_enable_rx_irq() {
    outb(UART_MCR, 0x0b);
    outb(UART_IER, 0x01);
}

/// Initialises the 8259 pair: master vectors 0x20.., slave 0x28.., edge
/// triggered, 8086 mode; unmasks IRQ 4 (UART), IRQ 2 (cascade) and the
/// lines in `extra` (bit n: IRQ n; the virtio devices and the PIT).
pub fn pic_init(extra: u16) {
    const MASTER_CMD: u16 = 0x20;
    const MASTER_DATA: u16 = 0x21;
    const SLAVE_CMD: u16 = 0xa0;
    const SLAVE_DATA: u16 = 0xa1;
    outb(MASTER_CMD, 0x11); // ICW1: init, ICW4 follows
    outb(SLAVE_CMD, 0x11);
    outb(MASTER_DATA, crate::entry::VEC_PIC_MASTER); // ICW2: vector base
    outb(SLAVE_DATA, crate::entry::VEC_PIC_SLAVE);
    outb(MASTER_DATA, 0x04); // ICW3: slave on IRQ 2
    outb(SLAVE_DATA, 0x02); // ICW3: cascade identity
    outb(MASTER_DATA, 0x01); // ICW4: 8086 mode
    outb(SLAVE_DATA, 0x01);
    let unmask = extra | (1 << 4) | (1 << 2);
    outb(MASTER_DATA, !(unmask as u8)); // OCW1: masks
    outb(SLAVE_DATA, !((unmask >> 8) as u8));
    IRQS_READY.store(true, Ordering::Relaxed);
}

/// Whether `idle` may be used (the PIC is programmed).
pub fn irqs_ready() -> bool {
    IRQS_READY.load(Ordering::Relaxed)
}

/// Local APIC spurious-interrupt vector register.
const LAPIC_SVR: usize = 0xfee0_00f0;

/// Software-enables the local APIC (SVR bit 8, spurious vector 0xff) so
/// that its LINT0 (ExtINT, programmed by the VMM) passes the PIC's
/// interrupts on. Needs the final page tables (the LAPIC page is mapped
/// user-accessible and uncached).
pub fn lapic_enable() {
    let svr = LAPIC_SVR as *mut u32;
    // SAFETY: 0xfee0_0000 is the architectural LAPIC page, identity-mapped
    // (uncached, user-accessible) by `paging::build`; SVR is a 32-bit
    // register accessed with aligned 32-bit loads and stores.
    unsafe {
        let v = svr.read_volatile();
        svr.write_volatile(v | 0x100 | u32::from(crate::entry::VEC_SPURIOUS));
    }
}

/// IOAPIC register select and window (architectural address, mapped
/// uncached and user-accessible with the MMIO gap).
const IOAPIC_REGSEL: usize = 0xfec0_0000;
const IOAPIC_WIN: usize = 0xfec0_0010;
/// Local APIC end-of-interrupt register.
const LAPIC_EOI: usize = 0xfee0_00b0;

/// Some IRQ is routed through the IOAPIC: `idle` must send a LAPIC EOI.
static IOAPIC_USED: AtomicBool = AtomicBool::new(false);

/// Routes IOAPIC pin `irq` (the GSIs 16..23 the 8259 pair does not have)
/// to VEC_IOAPIC on the boot CPU (APIC ID 0): fixed delivery, physical
/// destination, active high, edge triggered (the VMM's irqfds pulse).
/// Its gate only `iretq`s; `idle` sends the LAPIC EOI afterwards, at CPL3.
pub fn ioapic_route(irq: u32) {
    let sel = IOAPIC_REGSEL as *mut u32;
    let win = IOAPIC_WIN as *mut u32;
    // SAFETY: the IOAPIC's architectural window, identity-mapped uncached
    // and user-accessible; 32-bit aligned accesses.
    unsafe {
        sel.write_volatile(0x11 + 2 * irq); // high half: destination
        win.write_volatile(0);
        sel.write_volatile(0x10 + 2 * irq); // low half: vector, unmasked
        win.write_volatile(u32::from(crate::entry::VEC_IOAPIC));
    }
    IOAPIC_USED.store(true, Ordering::Relaxed);
}

/// Sleeps at CPL0 (`sti; hlt; cli`) until an interrupt arrives.
pub fn idle() {
    // SAFETY: the idle service only enables interrupts around `hlt` and
    // returns, preserving every register.
    unsafe { probe_service(SYS_IDLE, 0) }
    if IOAPIC_USED.load(Ordering::Relaxed) {
        // SAFETY: the LAPIC page is mapped (see `lapic_enable`); an EOI
        // with no interrupt in service is ignored.
        unsafe { (LAPIC_EOI as *mut u32).write_volatile(0) }
    }
}

/// Loads `pml4` into CR3 through the CPL0 service.
///
/// # Safety
/// `pml4` must be the physical address of page tables that map this program,
/// its stacks and the data it uses as the current tables do.
pub unsafe fn set_cr3(pml4: u64) {
    // SAFETY: the caller guarantees the new tables keep everything mapped;
    // the service executes `mov cr3, rsi` (a full TLB flush) and returns.
    unsafe { probe_service(SYS_SET_CR3, pml4) }
}

/// Executes `lock cmpxchg16b` at CPL0 (on this project's machines the CPL0
/// emulator refuses it: the VMM reports an emulation failure). Returns only
/// where CPL0 code runs natively.
pub fn fault_emulation() {
    // SAFETY: the service compares-exchanges a private 16-byte buffer and
    // preserves every register.
    unsafe { probe_service(SYS_FAULT_EMULATION, 0) }
}

/// Triple-faults the machine from CPL0 (the VMM sees a shutdown).
pub fn fault_triple() -> ! {
    // SAFETY: the service never returns: it loads an empty IDT and raises
    // #UD at CPL0.
    unsafe { probe_service(SYS_FAULT_TRIPLE, 0) };
    unreachable!("the triple-fault service returned")
}

/// Prints `PROBE POWEROFF` and powers off through ACPI S5 (the VMM exits
/// 0); resets through the i8042 if the VMM has no ACPI sleep register.
pub fn power_off() -> ! {
    put_str("PROBE POWEROFF\n");
    outw(ACPI_PM1A_CNT, ACPI_S5);
    reset()
}

/// Reports a kernel panic through pvpanic, then resets as Linux does with
/// panic=-1 (the VMM exits 4: the panic came first).
pub fn panic_reset() -> ! {
    put_str("PROBE PANIC\n");
    outb(PVPANIC, PVPANIC_PANICKED);
    reset()
}

/// Resets through the i8042 without printing.
pub fn reset() -> ! {
    outb(I8042_COMMAND, I8042_RESET);
    // The VMM should stop the vCPU on the reset; never spin on the host CPU.
    loop {
        idle();
    }
}

/// Ends a `PROBE ERROR ...` line that the caller has started and powers off.
pub fn fatal_end() -> ! {
    putc(b'\n');
    reset()
}

/// Prints `PROBE ERROR <msg>` and powers off.
pub fn fatal(msg: &str) -> ! {
    put_str("PROBE ERROR ");
    put_str(msg);
    fatal_end()
}
