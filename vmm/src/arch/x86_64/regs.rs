//! Long-mode register state for the Linux 64-bit boot protocol: identity-mapped
//! page tables, a boot GDT with __BOOT_CS = 0x10 and __BOOT_DS = 0x18, and
//! RSI pointing at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selectors the boot protocol mandates.
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot {what} to guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot {op} vCPU registers: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// A GDT descriptor from flags, base and limit (the classic packed layout).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment register matching a GDT descriptor.
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "a bit-field extraction, masked to at most 4 bits"
    )]
    let bits = |shift: u64, mask: u64| ((entry >> shift) & mask) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    #[allow(
        clippy::cast_possible_truncation,
        reason = "a bit-field extraction, masked to 20 bits"
    )]
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = bits(55, 1) == 1;
    kvm_segment {
        base,
        // The segment register holds the expanded byte limit.
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: index * 8,
        type_: bits(40, 0xf),
        present: bits(47, 1),
        dpl: bits(45, 0x3),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g: bits(55, 1),
        avl: bits(52, 1),
        padding: 0,
        unusable: u8::from(bits(47, 1) == 0),
    }
}

fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
        gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS (KVM needs a valid one)
    ]
}

/// Writes the boot GDT, an empty IDT and identity-mapped page tables for the
/// first 1 GiB (2 MiB pages) into guest memory, and returns the matching
/// special registers.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    vcpu: &kvm_ioctls::VcpuFd,
) -> Result<kvm_sregs, RegsError> {
    let memerr = |what| move |source| RegsError::Memory { what, source };
    let gdt = boot_gdt();
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(memerr("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(memerr("IDT"))?;

    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(memerr("PML4"))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(memerr("PDPT"))?;
    for i in 0..512u64 {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(memerr("page directory"))?;
    }

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|source| RegsError::Kvm { op: "read", source })?;
    let code = segment_from_gdt(gdt[2], BOOT_CS / 8);
    let data = segment_from_gdt(gdt[3], BOOT_DS / 8);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[4], BOOT_TSS / 8);
    sregs.gdt.base = BOOT_GDT_START;
    // Five 8-byte entries.
    sregs.gdt.limit = u16::try_from(std::mem::size_of_val(&gdt) - 1).unwrap_or(u16::MAX);
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    // Caches on (CD/NW clear), protected mode with paging, long mode.
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    Ok(sregs)
}

/// General registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// x87/SSE state after FNINIT with the default MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let gdt = boot_gdt();
        let cs = segment_from_gdt(gdt[2], 2);
        assert_eq!(cs.selector, BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(gdt[3], 3);
        assert_eq!(ds.selector, BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_, ds.base), (0, 1, 0x3, 0));
        let tss = segment_from_gdt(gdt[4], 4);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        // setup_sregs needs a vCPU for the rest; check the tables via the writer only.
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(k) => k,
            Err(_) => return, // No /dev/kvm in this environment: covered by the e2e tests.
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let sregs = setup_sregs(&mem, &vcpu).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 5 * 8)).unwrap();
        assert_eq!(pde, (5 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
    }
}
