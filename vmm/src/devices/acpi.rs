//! The hardware-reduced ACPI registers (sleep control, sleep status, reset)
//! and the pvpanic device: how a guest tells the VMM that it powered off,
//! reset or panicked. Every value comes from the guest: anything but the
//! documented writes is ignored (logged at debug level).

use std::sync::Arc;

use super::bus::BusDevice;
use crate::vcpu::{ExitOutcome, VmControl};

/// SLP_TYP of the DSDT's `_S5_` package: the value a guest writes to the
/// sleep control register to power off.
pub const S5_SLP_TYP: u8 = 5;
/// The FADT's RESET_VALUE, written to the reset register.
pub const RESET_VALUE: u8 = 1;
/// pvpanic events (QEMU's docs/specs/pvpanic.rst).
pub const PVPANIC_PANICKED: u8 = 1 << 0;
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// Register offsets from `layout::ACPI_PM_PORT`.
pub const OFS_SLEEP_CONTROL: u64 = 0;
pub const OFS_SLEEP_STATUS: u64 = 1;
pub const OFS_RESET: u64 = 2;

/// Sleep control register fields (ACPI 6.5, 4.8.3.7).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u8 = 1 << 5;

/// The value that powers the guest off; the reserved bits do not matter.
pub const fn s5_sleep_control_value() -> u8 {
    (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN
}

/// The sleep control, sleep status and reset registers, one byte each.
pub struct AcpiPm {
    control: Arc<VmControl>,
}

impl AcpiPm {
    pub fn new(control: Arc<VmControl>) -> Self {
        Self { control }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No sleep state was entered and none is woken from: WAK_STS reads 0,
        // and the write-only registers read as 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else {
            log::debug!(
                "ACPI PM: ignoring a {}-byte write at offset {offset}",
                data.len()
            );
            return;
        };
        match offset {
            OFS_SLEEP_CONTROL if value & (SLP_TYP_MASK | SLP_EN) == s5_sleep_control_value() => {
                self.control.request_exit(ExitOutcome::GuestPowerOff);
            }
            // WAK_STS is write-1-to-clear and never set: nothing to do.
            OFS_SLEEP_STATUS => {}
            OFS_RESET if value == RESET_VALUE => {
                self.control.request_exit(ExitOutcome::GuestReset);
            }
            _ => log::debug!("ACPI PM: ignoring write {value:#04x} at offset {offset}"),
        }
    }
}

/// The pvpanic I/O port: reads say which events the guest may send, a
/// PANICKED write records that the guest kernel panicked.
pub struct PvPanic {
    control: Arc<VmControl>,
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
