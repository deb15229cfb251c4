//! ACPI tables in the BIOS area (RSDP, XSDT, FADT, MADT, DSDT), for kernels
//! that find their CPUs, interrupt routing and devices through ACPI rather
//! than the MP table (distribution kernels without CONFIG_X86_MPPARSE).
//!
//! The platform is legacy (not hardware-reduced) ACPI, like a PC: PM1a
//! event and control blocks, an SCI (never raised), no GPEs, and a reset
//! register, all on the `AcpiPm` device. A hardware-reduced FADT would make
//! Linux drop the 8259 PIC and with it the ISA IRQs of the serial port, the
//! i8042 and the command-line virtio devices (measured: ttyS0 lost its
//! input, the i8042 probe failed with -EINVAL). The MADT describes the same CPUs, IOAPIC and NMI
//! wiring as `mptable`, so a guest sees one machine whichever table it reads.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    fit_u16, fit_u32, fit_u8, ACPI_END, ACPI_PM_PORT, ACPI_START, APIC_ADDR, IOAPIC_ADDR,
    IRQ_ACPI_SCI, IRQ_I8042, IRQ_SERIAL, PVPANIC_PORT,
};
use super::mptable::MAX_CPUS;
use crate::devices::acpi::{
    OFS_PM1_CNT, OFS_PM1_STS, OFS_RESET, PM1_CNT_LEN, PM1_EVT_LEN, RESET_VALUE, S5_SLP_TYP,
};

pub const OEM_ID: [u8; 6] = *b"KSMVM ";
pub const OEM_TABLE_ID: [u8; 8] = *b"KSMVM   ";
const OEM_REVISION: u32 = 1;
/// Tables start 16-byte aligned (the RSDP must be, the others like it).
const ALIGN: u64 = 16;

/// IAPC_BOOT_ARCH: an i8042 is present (without it Linux does not probe
/// the controller unless ACPI PNP lists it), there is no VGA to probe and
/// no CMOS RTC (ksmvm emulates neither; the clock is kvm-clock).
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;
/// MADT flags: the machine has (in-kernel) 8259 PICs as well.
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const MADT_INT_SRC_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_CPU_ENABLED: u32 = 1;
/// ISA IRQ 0 (the PIT) reaches IOAPIC pin 0 with the bus's default
/// polarity and trigger, as KVM's default routing and the MP table have it.
const TIMER_IRQ: u8 = 0;
const MPS_INTI_CONFORMING: u16 = 0;
/// The SCI: level triggered, active high, as PCs (and QEMU) declare it.
const MPS_INTI_LEVEL_HIGH: u16 = 0b1101;
/// IRQs below this are ISA IRQs, identity-mapped to GSIs by Linux.
const ISA_IRQS: u32 = 16;
/// The FACS must be 64-byte aligned.
const FACS_ALIGN: u64 = 64;
/// The SCI as the FADT's and MADT's fields hold it.
const SCI_IRQ: u8 = fit_u8(IRQ_ACPI_SCI as u64);

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables describe at most {MAX_CPUS} vCPUs, {0} requested")]
    TooManyCpus(u32),
    #[error("the ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(u64),
    #[error("virtio-mmio window {base:#x}+{size:#x} does not fit the DSDT's 32-bit fields")]
    MmioAbove4G { base: u64, size: u64 },
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

/// A virtio-mmio device. Those on GSIs above 15 are also announced in the
/// DSDT as Linux's "LNRO0005": an ACPI kernel maps such GSIs to IRQs only
/// for devices ACPI names, so the command line alone is not enough there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// The tables and where each goes; `rsdp` is the first.
#[derive(Debug, Clone)]
pub struct AcpiTables {
    pub rsdp: u64,
    pub tables: Vec<(u64, Vec<u8>)>,
}

/// Builds every table for `num_cpus` vCPUs and the given virtio devices.
pub fn build(num_cpus: u32, virtio: &[MmioDevice]) -> Result<AcpiTables, AcpiError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(num_cpus));
    }
    // APIC IDs are 8 bits (MAX_CPUS keeps the IOAPIC's ID, after the CPUs', too).
    let num_cpus = u8::try_from(num_cpus).map_err(|_| AcpiError::TooManyCpus(num_cpus))?;
    let dsdt = dsdt(virtio)?;
    let madt = madt(num_cpus);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let xsdt_len = 36 + 8 * 2;

    let mut next = ACPI_START;
    let mut place = |len: u64, align: u64| {
        let at = next.next_multiple_of(align);
        next = at + len;
        at
    };
    let rsdp_at = place(Rsdp::len() as u64, ALIGN);
    let facs_at = place(acpi_tables::facs::FACS::len() as u64, FACS_ALIGN);
    let xsdt_at = place(xsdt_len, ALIGN);
    let fadt_at = place(fadt_len, ALIGN);
    let madt_at = place(madt.len() as u64, ALIGN);
    let dsdt_at = place(dsdt.len() as u64, ALIGN);
    if next > ACPI_END {
        return Err(AcpiError::TooLarge(next - ACPI_START));
    }

    let fadt = to_bytes(&fadt(dsdt_at, facs_at));
    let facs = to_bytes(&acpi_tables::facs::FACS::new());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_at));
    Ok(AcpiTables {
        rsdp: rsdp_at,
        tables: vec![
            (rsdp_at, rsdp),
            (facs_at, facs),
            (xsdt_at, xsdt),
            (fadt_at, fadt),
            (madt_at, madt.as_slice().to_vec()),
            (dsdt_at, dsdt.as_slice().to_vec()),
        ],
    })
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn setup(
    mem: &GuestMemoryMmap,
    num_cpus: u32,
    virtio: &[MmioDevice],
) -> Result<u64, AcpiError> {
    let t = build(num_cpus, virtio)?;
    for (addr, bytes) in &t.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(AcpiError::Memory)?;
    }
    Ok(t.rsdp)
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_register(port: u64, bytes: u8) -> GAS {
    let access = match bytes {
        1 => AccessSize::ByteAccess,
        2 => AccessSize::WordAccess,
        _ => AccessSize::DwordAccess,
    };
    GAS::new(AddressSpace::SystemIo, bytes * 8, 0, access, port)
}

fn fadt(dsdt_at: u64, facs_at: u64) -> impl Aml {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_at)
        .firmware_ctrl_64(facs_at)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    // No SMI_CMD: the platform is in ACPI mode from the start.
    f.sci_int = u16::from(SCI_IRQ).into();
    const EVT: u64 = ACPI_PM_PORT + OFS_PM1_STS;
    const CNT: u64 = ACPI_PM_PORT + OFS_PM1_CNT;
    f.pm1a_evt_blk = const { fit_u32(EVT) }.into();
    f.pm1_evt_len = PM1_EVT_LEN;
    f.x_pm1a_evt_blk = io_register(EVT, PM1_EVT_LEN);
    f.pm1a_cnt_blk = const { fit_u32(CNT) }.into();
    f.pm1_cnt_len = PM1_CNT_LEN;
    f.x_pm1a_cnt_blk = io_register(CNT, PM1_CNT_LEN);
    f.reset_reg = io_register(ACPI_PM_PORT + OFS_RESET, 1);
    f.reset_value = RESET_VALUE;
    f.finalize()
}

fn madt(num_cpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, const { fit_u32(APIC_ADDR) });
    t.write_u32(40, MADT_PCAT_COMPAT);
    // APIC IDs 0..num_cpus and the IOAPIC's ID after them, as in the MP table.
    for cpu in 0..num_cpus {
        let mut e = vec![MADT_LOCAL_APIC, 8, cpu, cpu];
        e.extend_from_slice(&MADT_CPU_ENABLED.to_le_bytes());
        t.append_slice(&e);
    }
    let mut e = vec![MADT_IOAPIC, 12, num_cpus, 0];
    e.extend_from_slice(&const { fit_u32(IOAPIC_ADDR) }.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    t.append_slice(&e);
    for (irq, flags) in [
        (TIMER_IRQ, MPS_INTI_CONFORMING),
        (SCI_IRQ, MPS_INTI_LEVEL_HIGH),
    ] {
        let mut e = vec![MADT_INT_SRC_OVERRIDE, 10, 0, irq];
        e.extend_from_slice(&u32::from(irq).to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        t.append_slice(&e);
    }
    // NMI on LINT1 of every processor (UID 0xff), like the MP table's entry.
    let mut e = vec![MADT_LOCAL_APIC_NMI, 6, 0xff];
    e.extend_from_slice(&MPS_INTI_CONFORMING.to_le_bytes());
    e.push(1);
    t.append_slice(&e);
    t
}

/// An ISA-style interrupt: edge triggered, active high, not shared.
fn edge_high(irq: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, irq)
}

/// AML already serialised (names built at run time borrow nothing).
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Device `Vnnn` (the index) with the window and GSI of one virtio device.
fn virtio_device((index, d): (usize, &MmioDevice)) -> Result<RawAml, AcpiError> {
    // There are fewer devices than IRQs, far fewer than 2^32.
    let uid = u32::try_from(index).unwrap_or(u32::MAX);
    let above = || AcpiError::MmioAbove4G {
        base: d.base,
        size: d.size,
    };
    let base = u32::try_from(d.base).map_err(|_| above())?;
    let size = u32::try_from(d.size).map_err(|_| above())?;
    let name = format!("V{:03}", index % 1000);
    // One statement: the builders borrow their temporaries.
    Ok(RawAml(to_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            // virtio-mmio DMA is cache coherent.
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Memory32Fixed::new(true, base, size),
                    &edge_high(d.irq),
                ]),
            ),
        ],
    ))))
}

/// `Device(name) { _HID, _CRS }` with the given resources.
fn legacy_device(name: &str, hid: &dyn Aml, resources: Vec<&dyn Aml>) -> RawAml {
    RawAml(to_bytes(&aml::Device::new(
        name.into(),
        vec![
            &aml::Name::new("_HID".into(), hid),
            &aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(resources)),
        ],
    )))
}

/// The DSDT: the `_S5_` sleep package and, in `\_SB`, the legacy devices
/// Linux finds through PNP ACPI, the pvpanic device and the virtio devices.
fn dsdt(virtio: &[MmioDevice]) -> Result<Sdt, AcpiError> {
    let com1 = legacy_device(
        "COM1",
        &aml::EISAName::new("PNP0501"),
        vec![&aml::IO::new(0x3f8, 0x3f8, 1, 8), &edge_high(IRQ_SERIAL)],
    );
    // Data port first, then command/status: the order i8042-acpipnpio reads.
    let kbd = legacy_device(
        "PS2K",
        &aml::EISAName::new("PNP0303"),
        vec![
            &aml::IO::new(0x60, 0x60, 1, 1),
            &aml::IO::new(0x64, 0x64, 1, 1),
            &edge_high(IRQ_I8042),
        ],
    );
    let port = const { fit_u16(PVPANIC_PORT) };
    let pvpanic = legacy_device("PEVT", &"QEMU0001", vec![&aml::IO::new(port, port, 1, 1)]);
    // Devices on ISA IRQs stay on the command line only: Linux maps those
    // IRQs itself, and a device named twice is probed twice (the second
    // probe fails with -EBUSY). Measured in the test host: with every device
    // named in both places, 4 of 38 boots of the project kernel hung or
    // triple-faulted right after that failed probe.
    let virtio_devs: Vec<RawAml> = virtio
        .iter()
        .enumerate()
        .filter(|(_, d)| d.irq >= ISA_IRQS)
        .map(virtio_device)
        .collect::<Result<_, _>>()?;

    let mut sb: Vec<&dyn Aml> = vec![&com1, &kbd, &pvpanic];
    sb.extend(virtio_devs.iter().map(|d| d as &dyn Aml));
    let mut body = to_bytes(&aml::Scope::new("\\_SB_".into(), sb));
    // SLP_TYPa, SLP_TYPb and two reserved entries; there is no PM1b block.
    body.extend(to_bytes(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    )));

    // Revision 2: 64-bit AML integers.
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&body);
    Ok(t)
}

#[cfg(test)]
mod tests;
