//! The ACPI PM1 registers (event and control blocks) and reset register,
//! and the pvpanic device: how a guest tells the VMM that it powered off,
//! reset or panicked. Every value comes from the guest: anything but the
//! documented accesses is ignored (logged at debug level).
//!
//! The PM1 blocks are those of a legacy (not hardware-reduced) ACPI
//! platform: a hardware-reduced FADT makes Linux drop the 8259 PIC and with
//! it the ISA IRQ numbers that the serial port, the i8042 and the
//! `virtio_mmio.device=` entries use.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::vcpu::{ExitOutcome, VmControl};

/// SLP_TYP of the DSDT's `_S5_` package: the value a guest writes into
/// PM1_CNT to power off.
pub const S5_SLP_TYP: u8 = 5;
/// The FADT's RESET_VALUE, written to the reset register.
pub const RESET_VALUE: u8 = 1;
/// pvpanic events (QEMU's docs/specs/pvpanic.rst).
pub const PVPANIC_PANICKED: u8 = 1 << 0;
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// Register offsets from `layout::ACPI_PM_PORT`: PM1a_EVT_BLK (status,
/// enable: 2 bytes each), PM1a_CNT_BLK (2 bytes), the reset register.
pub const OFS_PM1_STS: u64 = 0;
pub const OFS_PM1_EN: u64 = 2;
pub const OFS_PM1_CNT: u64 = 4;
pub const OFS_RESET: u64 = 6;
pub const PM1_EVT_LEN: u8 = 4;
pub const PM1_CNT_LEN: u8 = 2;

/// PM1_CNT fields (ACPI 6.5, 4.8.3.2.1).
const SCI_EN: u16 = 1;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;

/// The PM1_CNT value that powers the guest off.
pub const fn s5_pm1_cnt_value() -> u16 {
    ((S5_SLP_TYP as u16) << SLP_TYP_SHIFT) | SLP_EN
}

/// PM1 status/enable/control and the reset register.
pub struct AcpiPm {
    control: Arc<VmControl>,
    /// PM1_EN as the guest last wrote it (no event is ever raised).
    enable: u16,
    /// PM1_CNT's SLP_TYP as last written (Linux writes it, then SLP_EN).
    slp_typ: u16,
}

// VmControl, shared with the vCPU threads, is not Debug.
impl std::fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPm")
            .field("enable", &self.enable)
            .field("slp_typ", &self.slp_typ)
            .finish_non_exhaustive()
    }
}

impl AcpiPm {
    pub fn new(control: Arc<VmControl>) -> Self {
        Self {
            control,
            enable: 0,
            slp_typ: 0,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // The platform is always in ACPI mode (no SMI_CMD): SCI_EN reads 1.
        let value = match offset {
            OFS_PM1_EN => self.enable,
            OFS_PM1_CNT => SCI_EN | self.slp_typ,
            _ => return,
        };
        if let [lo, hi] = data {
            [*lo, *hi] = value.to_le_bytes();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            // Write-1-to-clear, and no status bit is ever set.
            (OFS_PM1_STS, [_, _]) => {}
            (OFS_PM1_EN, [lo, hi]) => self.enable = u16::from_le_bytes([*lo, *hi]),
            (OFS_PM1_CNT, [lo, hi]) => {
                let v = u16::from_le_bytes([*lo, *hi]);
                self.slp_typ = v & SLP_TYP_MASK;
                if v & (SLP_TYP_MASK | SLP_EN) == s5_pm1_cnt_value() {
                    self.control.request_exit(ExitOutcome::GuestPowerOff);
                } else if v & SLP_EN != 0 {
                    log::debug!("ACPI PM: ignoring sleep request {v:#06x} (only S5 is supported)");
                }
            }
            (OFS_RESET, [v]) if *v == RESET_VALUE => {
                self.control.request_exit(ExitOutcome::GuestReset);
            }
            _ => log::debug!("ACPI PM: ignoring write {data:02x?} at offset {offset}"),
        }
    }
}

/// The pvpanic I/O port: reads say which events the guest may send, a
/// PANICKED write records that the guest kernel panicked.
pub struct PvPanic {
    control: Arc<VmControl>,
}

impl std::fmt::Debug for PvPanic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvPanic").finish_non_exhaustive()
    }
}

impl PvPanic {
    pub fn new(control: Arc<VmControl>) -> Self {
        Self { control }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let [b] = data {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data {
            [v] if v & PVPANIC_PANICKED != 0 => self.control.guest_panicked(),
            // A kdump kernel is about to take over: not an end of the VM.
            [v] if v & PVPANIC_CRASH_LOADED != 0 => {
                log::info!("the guest kernel crashed and is loading its crash kernel")
            }
            _ => log::debug!("pvpanic: ignoring write {data:02x?}"),
        }
    }
}

#[cfg(test)]
mod tests;
