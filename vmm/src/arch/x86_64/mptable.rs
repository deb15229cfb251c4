//! The Intel MultiProcessor table at the EBDA, which tells a guest how many
//! CPUs there are and how legacy IRQs reach the IOAPIC.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{fit_u32, fit_u8, APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_MAX};

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Largest vCPU count the table can describe (APIC IDs are 8 bits and the
/// IOAPIC takes the next ID).
pub const MAX_CPUS: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("the MP table describes at most {MAX_CPUS} vCPUs, {0} requested")]
    TooManyCpus(u32),
    #[error("cannot write the MP table to guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer structure followed by the configuration table.
pub fn build(num_cpus: u32) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let table_addr = const { fit_u32(EBDA_START + 16) };
    // APIC IDs are 8 bits; the IOAPIC takes the one after the CPUs'.
    let ioapic_id = u8::try_from(num_cpus).map_err(|_| MpTableError::TooManyCpus(num_cpus))?;

    let mut t = Vec::with_capacity(512);
    // Configuration table header; length and checksum patched below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&0u16.to_le_bytes());
    t.push(MPC_SPEC);
    t.push(0);
    t.extend_from_slice(b"KSMVM   ");
    t.extend_from_slice(b"000000000000");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    let count_at = t.len();
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count
    t.extend_from_slice(&const { fit_u32(APIC_ADDR) }.to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    let mut entries: u16 = 0;

    for cpu in 0..ioapic_id {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        t.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        // Signature (family 6) and feature flags (FPU, APIC).
        t.extend_from_slice(&0x600u32.to_le_bytes());
        t.extend_from_slice(&0x201u32.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    t.extend_from_slice(&[1, 0]);
    t.extend_from_slice(b"ISA   ");
    entries += 1;
    t.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    t.extend_from_slice(&const { fit_u32(IOAPIC_ADDR) }.to_le_bytes());
    entries += 1;
    for irq in 0..=const { fit_u8(IRQ_MAX as u64) } {
        t.extend_from_slice(&[3, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        entries += 1;
    }
    t.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    t.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;

    // MAX_CPUS entries of 20 bytes and a few more: about 5 KiB.
    let len = u16::try_from(t.len()).unwrap_or(u16::MAX);
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[count_at..count_at + 2].copy_from_slice(&entries.to_le_bytes());
    t[7] = checksum(&t);

    let mut mpf = Vec::with_capacity(16 + t.len());
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.extend_from_slice(&[1, MPC_SPEC, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&t);
    Ok(mpf)
}

/// Writes the MP table for `num_cpus` vCPUs at the EBDA.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u32) -> Result<(), MpTableError> {
    let bytes = build(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MpTableError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_valid() {
        let b = build(3).unwrap();
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(sum(&b[0..16]), 0);
        let t = &b[16..];
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(sum(t), 0);
        let cpus = t[44..].chunks(20).take_while(|e| e[0] == 0).count();
        assert_eq!(cpus, 3);
        let entries = u16::from_le_bytes([t[34], t[35]]);
        assert_eq!(entries, 3 + 1 + 1 + 24 + 2);
        // Even the largest table stays below where kernels are loaded.
        let largest = build(MAX_CPUS).unwrap();
        assert!(EBDA_START + largest.len() as u64 <= crate::arch::x86_64::layout::HIMEM_START);
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert!(build(0).is_err());
        assert!(build(MAX_CPUS + 1).is_err());
        assert!(build(MAX_CPUS).is_ok());
    }
}
