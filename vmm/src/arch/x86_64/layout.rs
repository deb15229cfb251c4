//! Guest physical memory layout, modelled on Firecracker's x86-64 layout.
//!
//! ```text
//! 0x0000_0000 ..0x0009_fc00  RAM (real-mode area; boot structures live here)
//! 0x0009_fc00 ..0x000e_0000  EBDA (MP table) and legacy VGA hole, not RAM
//! 0x000e_0000 ..0x0010_0000  BIOS area: ACPI tables (RSDP first), not RAM
//! 0x0010_0000 ..MMIO_GAP_START  RAM (kernel, initrd, guest)
//! MMIO_GAP_START..4 GiB      32-bit MMIO gap: virtio-mmio devices, IOAPIC, LAPIC
//! 4 GiB ..                   the rest of RAM
//! ```

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty: the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// Boot stack pointer handed to the kernel.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Zero page (struct boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapped page tables: PML4, PDPT, then PDs.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept (the x86 kernel's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the RSDP at the start of the BIOS area that Linux scans
/// for it, the other tables after it. Outside the e820 RAM map, so the
/// guest never reuses the memory.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Start of high memory: kernels are loaded at or above this address.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First address past 32 bits: RAM continues here.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Size of the MMIO gap.
pub const MMIO_GAP_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO_GAP_START;
/// virtio-mmio device windows: 4 KiB each, from the start of the gap.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Legacy IRQs: 1 is the i8042, 4 the UART; virtio devices get 5.. upwards.
pub const IRQ_I8042: u32 = 1;
pub const IRQ_SERIAL: u32 = 4;
pub const IRQ_VIRTIO_BASE: u32 = 5;
pub const IRQ_MAX: u32 = 23;

/// The IRQ of virtio device `index`: IRQ_VIRTIO_BASE upwards, skipping
/// the ACPI SCI.
pub const fn virtio_irq(index: u32) -> u32 {
    let irq = IRQ_VIRTIO_BASE + index;
    if irq >= IRQ_ACPI_SCI {
        irq + 1
    } else {
        irq
    }
}
/// ACPI PM registers on the port I/O bus: PM1a event block (4 bytes),
/// PM1a control block (2 bytes) and the reset register (devices::acpi).
pub const ACPI_PM_PORT: u64 = 0x600;
pub const ACPI_PM_PORTS: u64 = 8;
/// The ACPI SCI, where PCs have it. ksmvm never raises it, but Linux
/// claims it, so no virtio device gets it (see `virtio_irq`).
pub const IRQ_ACPI_SCI: u32 = 9;
/// The pvpanic device's port (QEMU's default, what its guests expect).
pub const PVPANIC_PORT: u64 = 0x505;
/// IOAPIC and local APIC MMIO windows (fixed by the architecture).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS and identity map pages, placed just below the LAPIC like Firecracker.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Highest address an initrd may end at for kernels that don't say otherwise
/// (boot protocol's default initrd_addr_max).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Smallest guest we boot: the kernel, boot structures and a little room.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest we boot: keeps every address well inside 40 physical bits.
pub const MAX_MEM_MIB: u64 = 1 << 20;

// Narrowings of the constants above to the table and register fields that
// hold them, for `const` items and blocks: there, a value that does not
// fit its field fails the build, so the casts cannot truncate.

/// `n` as a 32-bit field (in a `const`: checked at compile time).
#[allow(clippy::cast_possible_truncation, reason = "asserted to fit")]
pub const fn fit_u32(n: u64) -> u32 {
    assert!(n <= 0xffff_ffff, "does not fit in 32 bits");
    n as u32
}

/// `n` as a 16-bit field (in a `const`: checked at compile time).
#[allow(clippy::cast_possible_truncation, reason = "asserted to fit")]
pub const fn fit_u16(n: u64) -> u16 {
    assert!(n <= 0xffff, "does not fit in 16 bits");
    n as u16
}

/// `n` as an 8-bit field (in a `const`: checked at compile time).
#[allow(clippy::cast_possible_truncation, reason = "asserted to fit")]
pub const fn fit_u8(n: u64) -> u8 {
    assert!(n <= 0xff, "does not fit in 8 bits");
    n as u8
}
