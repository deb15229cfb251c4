//! Time at CPL3: the TSC (`rdtsc` is allowed at CPL3: the probe never sets
//! CR4.TSD), its rate measured once against the 8254 PIT, and a PIT one-shot
//! that bounds every sleep while the probe waits for a device.

use crate::io::{inb, outb};
use core::sync::atomic::{AtomicU64, Ordering};

/// The PIT's input clock.
const PIT_HZ: u64 = 1_193_182;
const PIT_CH0: u16 = 0x40;
const PIT_CH2: u16 = 0x42;
const PIT_CMD: u16 = 0x43;
/// Port 0x61: bit 0 gates PIT channel 2, bit 1 drives the speaker, bit 5
/// reads channel 2's output.
const PORT_B: u16 = 0x61;
/// Calibration interval: 10 ms of PIT ticks.
const CAL_TICKS: u64 = PIT_HZ / 100;
/// Length of the wake-up one-shot: 10 ms.
const WAKE_TICKS: u16 = (PIT_HZ / 100) as u16;
/// TSC rate assumed for timeouts when calibration failed.
const FALLBACK_HZ: u64 = 3_000_000_000;

/// Measured TSC rate in Hz (0: not measured or implausible).
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the TSC; CR4.TSD is clear, so it is allowed
    // at CPL3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Measures the TSC rate over 10 ms of PIT channel 2 (mode 0, gated through
/// port 0x61, as Linux's `pit_calibrate_tsc`). Leaves 0 when the PIT does not
/// answer plausibly (then rates are reported as 0.0).
pub fn calibrate() {
    let port_b = inb(PORT_B);
    outb(PORT_B, (port_b & !0x02) | 0x01); // gate on, speaker off
    outb(PIT_CMD, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(PIT_CH2, CAL_TICKS as u8);
    outb(PIT_CH2, (CAL_TICKS >> 8) as u8);
    let start = rdtsc();
    let mut end = start;
    let mut done = false;
    // 2^33 cycles is seconds at any TSC rate: reached only without a PIT.
    while end.wrapping_sub(start) < 1 << 33 {
        if inb(PORT_B) & 0x20 != 0 {
            done = true;
            break;
        }
        end = rdtsc();
    }
    end = rdtsc();
    outb(PORT_B, port_b);
    let hz = end.wrapping_sub(start) * PIT_HZ / CAL_TICKS;
    // A plausible rate is 100 MHz..20 GHz.
    if done && (100_000_000..20_000_000_000).contains(&hz) {
        TSC_HZ.store(hz, Ordering::Relaxed);
    }
}

/// The measured TSC rate in Hz, 0 if unknown.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// The TSC rate to compute timeouts with.
pub fn timeout_hz() -> u64 {
    match tsc_hz() {
        0 => FALLBACK_HZ,
        hz => hz,
    }
}

/// Starts a 10 ms one-shot on PIT channel 0 (mode 0): IRQ 0 fires once when
/// it expires, so a sleep that no device ends still ends.
pub fn arm_wakeup() {
    outb(PIT_CMD, 0x30); // channel 0, lobyte/hibyte, mode 0, binary
    outb(PIT_CH0, WAKE_TICKS as u8);
    outb(PIT_CH0, (WAKE_TICKS >> 8) as u8);
}

/// `bytes` transferred in `cycles` TSC cycles, in MiB/s times 10 (0 when the
/// TSC rate is unknown or no time passed).
pub fn mib_per_s_x10(bytes: u64, cycles: u64) -> u64 {
    let hz = tsc_hz();
    if hz == 0 || cycles == 0 {
        return 0;
    }
    (u128::from(bytes) * 10 * u128::from(hz) / (u128::from(cycles) << 20)) as u64
}
