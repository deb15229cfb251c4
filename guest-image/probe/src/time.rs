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
/// Calibration interval: 40 ms of PIT ticks (within the 16-bit count).
const CAL_TICKS: u64 = PIT_HZ / 25;
/// Widest TSC bracket around a PIT count read that is trusted: 100,000
/// cycles (20..100 µs at 1..5 GHz, while the PIT ticks every 0.84 µs).
const CAL_BRACKET: u64 = 100_000;
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

/// Measures the TSC rate against PIT channel 2 (mode 0, gated through port
/// 0x61, counting down from 0xffff): reads the latched count twice, 40 ms
/// (47,727 PIT ticks) apart, each time between two TSC reads that are close
/// together, so that a vCPU descheduled by the host cannot skew the result
/// (the error is the bracket width, some µs, over 40 ms). Leaves 0 when the
/// PIT does not answer plausibly (rates then print 0.0).
pub fn calibrate() {
    let port_b = inb(PORT_B);
    outb(PORT_B, (port_b & !0x02) | 0x01); // gate on, speaker off
    outb(PIT_CMD, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(PIT_CH2, 0xff);
    outb(PIT_CH2, 0xff);
    let hz = measure();
    outb(PORT_B, port_b);
    // A plausible rate is 100 MHz..20 GHz.
    if let Some(hz) = hz.filter(|hz| (100_000_000..20_000_000_000).contains(hz)) {
        TSC_HZ.store(hz, Ordering::Relaxed);
    }
}

/// (TSC, channel 2 count) read close together, if found within 1000 tries.
fn sample() -> Option<(u64, u64)> {
    for _ in 0..1000 {
        let t0 = rdtsc();
        outb(PIT_CMD, 0x80); // latch channel 2
        let lo = u64::from(inb(PIT_CH2));
        let hi = u64::from(inb(PIT_CH2));
        let t1 = rdtsc();
        if t1.wrapping_sub(t0) < CAL_BRACKET {
            return Some((t0 + (t1 - t0) / 2, hi << 8 | lo));
        }
    }
    None
}

/// The TSC rate from two tight samples CAL_TICKS apart.
fn measure() -> Option<u64> {
    let (t_a, c_a) = sample()?;
    let start = rdtsc();
    // 2^33 cycles is seconds at any TSC rate: reached only without a PIT.
    while rdtsc().wrapping_sub(start) < 1 << 33 {
        let (t_b, c_b) = sample()?;
        if c_b > c_a {
            return None; // the count went up: no working PIT
        }
        if c_a - c_b >= CAL_TICKS {
            return Some(t_b.wrapping_sub(t_a) * PIT_HZ / (c_a - c_b));
        }
    }
    None
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
