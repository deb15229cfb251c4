//! The IDT contents and the final page tables, both built natively at CPL3
//! (in user-accessible .bss) and put in use through the CPL0 gates.

use crate::boot::{E820, E820_RAM};
use crate::entry;
use core::cell::UnsafeCell;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_HUGE: u64 = 1 << 7;
/// Flags of non-leaf entries.
const TABLE: u64 = PTE_PRESENT | PTE_WRITE | PTE_USER;
/// Flags of RAM leaves (write-back).
const LEAF_RAM: u64 = PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE;
/// Flags of MMIO leaves (uncached).
const LEAF_MMIO: u64 = LEAF_RAM | PTE_PWT | PTE_PCD;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 1 << 21;
/// Start and end of the 32-bit MMIO gap (virtio-mmio, IOAPIC, LAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// PDPTs: each maps 512 GiB with 1 GiB pages (the VMM's RAM limit is 1 TiB).
const NPDPT: usize = 3;
/// PDs for the 2 MiB-page fallback (no CPUID pdpe1gb): maps 64 GiB.
const NPD: usize = 64;

#[repr(C, align(4096))]
struct Tables {
    pml4: [u64; 512],
    pdpt: [[u64; 512]; NPDPT],
    pd: [[u64; 512]; NPD],
}

/// Interior-mutable static for this single-threaded program.
struct Global<T>(UnsafeCell<T>);
// SAFETY: the probe runs on one vCPU and never touches these from
// interrupt handlers (which are CPL0 assembly that uses no Rust data).
unsafe impl<T> Sync for Global<T> {}

static TABLES: Global<Tables> = Global(UnsafeCell::new(Tables {
    pml4: [0; 512],
    pdpt: [[0; 512]; NPDPT],
    pd: [[0; 512]; NPD],
}));

/// Encodes a 64-bit interrupt gate (present, DPL0) to `handler` (CPL0).
fn gate(handler: u64) -> [u64; 2] {
    let attrs: u64 = 0x8e;
    [
        (handler & 0xffff)
            | (u64::from(entry::KERNEL_CS) << 16)
            | (attrs << 40)
            | (((handler >> 16) & 0xffff) << 48),
        handler >> 32,
    ]
}

/// Fills the (already loaded) IDT: exceptions, PIC IRQs and the LAPIC
/// spurious vector. All gates are DPL0: CPL3 reaches CPL0 only through
/// exceptions (see `probe_service` in entry.rs).
pub fn init_idt() {
    let set = |vector: u8, handler: unsafe extern "C" fn()| {
        let g = gate(handler as usize as u64);
        // SAFETY: IDT is 256 16-byte gates in our .bss; nothing else
        // references it from Rust, and no interrupt can arrive while a gate
        // is half-written (IF=0 at CPL3, and the code here cannot fault).
        unsafe {
            let idt = core::ptr::addr_of_mut!(entry::IDT).cast::<u64>();
            idt.add(2 * usize::from(vector)).write_volatile(g[0]);
            idt.add(2 * usize::from(vector) + 1).write_volatile(g[1]);
        }
    };
    // SAFETY: EXCEPTION_STUBS is an immutable table of 32 code addresses.
    let stubs = unsafe { entry::EXCEPTION_STUBS };
    for (vector, &stub) in stubs.iter().enumerate() {
        // SAFETY: each entry is the address of an exception stub, a valid
        // function address (it is only ever reached through the IDT).
        let handler: unsafe extern "C" fn() = unsafe { core::mem::transmute(stub as usize) };
        set(vector as u8, handler);
    }
    for irq in 0..8 {
        set(entry::VEC_PIC_MASTER + irq, entry::isr_irq_master);
        set(entry::VEC_PIC_SLAVE + irq, entry::isr_irq_slave);
    }
    set(entry::VEC_SPURIOUS, entry::isr_spurious);
}

/// Builds page tables that identity-map every e820 RAM range (rounded out to
/// the page size), the first 2 MiB (boot data, MP table) and the 32-bit MMIO
/// gap (uncached), all user-accessible; loads them; returns the first address
/// past what the tables can map (RAM above it stays unmapped and unused).
///
/// `gib_pages`: CPUID says 1 GiB pages are supported.
pub fn build_and_load(e820: &E820, gib_pages: bool) -> u64 {
    let t = TABLES.0.get();
    let limit = if gib_pages {
        NPDPT as u64 * 512 * GIB
    } else {
        NPD as u64 * GIB
    };
    let map = |start: u64, end: u64, leaf: u64| {
        let end = end.min(limit);
        if start >= end {
            return;
        }
        // SAFETY: `t` points at our static tables, which are not in use by
        // the MMU yet (CR3 still holds the bootstrap tables) and are only
        // accessed here. All indices are bounded by `limit`.
        unsafe {
            let pml4 = core::ptr::addr_of_mut!((*t).pml4).cast::<u64>();
            let pdpt = core::ptr::addr_of_mut!((*t).pdpt).cast::<u64>();
            let pd = core::ptr::addr_of_mut!((*t).pd).cast::<u64>();
            if gib_pages {
                for g in start / GIB..end.div_ceil(GIB) {
                    let g = g as usize;
                    *pml4.add(g / 512) = pdpt.add(g / 512 * 512) as u64 | TABLE;
                    *pdpt.add(g) = (g as u64 * GIB) | leaf;
                }
            } else {
                for p in start / MIB2..end.div_ceil(MIB2) {
                    let p = p as usize;
                    let g = p / 512;
                    *pml4 = pdpt as u64 | TABLE;
                    *pdpt.add(g) = pd.add(g * 512) as u64 | TABLE;
                    *pd.add(p) = (p as u64 * MIB2) | leaf;
                }
            }
        }
    };
    map(0, MIB2, LEAF_RAM);
    for e in e820.iter().filter(|e| e.kind == E820_RAM) {
        map(e.addr, e.addr.saturating_add(e.size), LEAF_RAM);
    }
    map(MMIO_GAP_START, MMIO_GAP_END, LEAF_MMIO);
    // SAFETY: the new tables identity-map the first 2 MiB page and every RAM
    // range, which include this image (at 1 MiB), its stacks and all boot
    // data, with the same addresses as the bootstrap tables.
    unsafe { crate::io::set_cr3(t as u64) };
    limit
}
