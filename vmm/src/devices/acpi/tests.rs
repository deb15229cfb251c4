use super::*;
use crate::vcpu::PANIC_GRACE;

fn pm() -> (AcpiPm, Arc<VmControl>) {
    let control = VmControl::new().unwrap();
    (AcpiPm::new(control.clone()), control)
}

#[test]
fn s5_powers_off() {
    let (mut dev, control) = pm();
    // Linux clears PM1 status, writes SLP_TYP, then SLP_TYP | SLP_EN.
    dev.write(OFS_PM1_STS, &[0xff, 0xff]);
    dev.write(OFS_PM1_CNT, &(5u16 << 10).to_le_bytes());
    assert!(!control.stopping());
    let mut b = [0u8; 2];
    dev.read(OFS_PM1_CNT, &mut b);
    assert_eq!(
        u16::from_le_bytes(b),
        (5 << 10) | 1,
        "SLP_TYP kept, SCI_EN set"
    );
    dev.write(OFS_PM1_CNT, &0x3401u16.to_le_bytes());
    assert!(control.stopping());
    assert_eq!(control.outcome(), Some(ExitOutcome::GuestPowerOff));
    assert_eq!(s5_pm1_cnt_value(), 0x3400);
}

#[test]
fn other_pm1_cnt_bits_do_not_matter() {
    let (mut dev, control) = pm();
    dev.write(OFS_PM1_CNT, &(0x3400u16 | 0xc3ff).to_le_bytes());
    assert_eq!(control.outcome(), Some(ExitOutcome::GuestPowerOff));
}

#[test]
fn reset_register_resets() {
    let (mut dev, control) = pm();
    dev.write(OFS_RESET, &[RESET_VALUE]);
    assert_eq!(control.outcome(), Some(ExitOutcome::GuestReset));
}

#[test]
fn hostile_pm_writes_are_ignored() {
    let (mut dev, control) = pm();
    // Other sleep types with SLP_EN, SLP_TYP 5 without it, SLP_EN alone.
    for v in [
        (1u16 << 10) | (1 << 13),
        (3 << 10) | (1 << 13),
        (7 << 10) | (1 << 13),
        5 << 10,
        1 << 13,
        0,
        !(1u16 << 13),
    ] {
        dev.write(OFS_PM1_CNT, &v.to_le_bytes());
    }
    for v in [0u8, 2, 0x06, 0xfe, 0xff] {
        dev.write(OFS_RESET, &[v]);
    }
    // The right values at the wrong width or offset.
    dev.write(OFS_PM1_CNT, &[0x00]);
    dev.write(OFS_PM1_CNT + 1, &[0x34]);
    dev.write(OFS_PM1_CNT, &[0x00, 0x34, 0, 0]);
    dev.write(OFS_RESET, &[RESET_VALUE, 0]);
    dev.write(OFS_PM1_CNT, &[]);
    dev.write(OFS_PM1_STS, &0x3400u16.to_le_bytes());
    dev.write(OFS_PM1_EN, &0x3400u16.to_le_bytes());
    dev.write(OFS_PM1_STS, &[RESET_VALUE]);
    dev.write(7, &[RESET_VALUE]);
    dev.write(u64::MAX, &[RESET_VALUE]);
    assert!(!control.stopping());
    assert_eq!(control.outcome(), None);
}

#[test]
fn pm_registers_read_what_was_written_or_zero() {
    let (mut dev, _control) = pm();
    dev.write(OFS_PM1_EN, &0x0121u16.to_le_bytes());
    let mut b = [0xaa; 2];
    dev.read(OFS_PM1_EN, &mut b);
    assert_eq!(u16::from_le_bytes(b), 0x0121);
    for ofs in [OFS_PM1_STS, OFS_RESET, 7, u64::MAX] {
        for len in [0, 1, 2, 4, 8] {
            let mut b = vec![0xaa; len];
            dev.read(ofs, &mut b);
            assert!(b.iter().all(|x| *x == 0), "offset {ofs} len {len}");
        }
    }
    // Odd widths of the 16-bit registers read zero.
    for len in [1, 4, 8] {
        let mut b = vec![0xaa; len];
        dev.read(OFS_PM1_CNT, &mut b);
        assert!(b.iter().all(|x| *x == 0), "PM1_CNT len {len}");
    }
}

#[test]
fn pvpanic_reports_its_events_and_records_a_panic() {
    let control = VmControl::new().unwrap();
    let mut dev = PvPanic::new(control.clone());
    let mut b = [0u8];
    dev.read(0, &mut b);
    assert_eq!(b[0], PVPANIC_PANICKED | PVPANIC_CRASH_LOADED);
    let before = std::time::Instant::now();
    dev.write(0, &[PVPANIC_PANICKED]);
    assert_eq!(control.outcome(), Some(ExitOutcome::GuestPanic));
    // The VM runs on for the console flush and the reset that follows...
    assert!(!control.stopping());
    let deadline = control.stop_deadline().expect("a stop deadline");
    assert!(deadline >= before + PANIC_GRACE);
    // ...and that reset does not replace the panic as the outcome.
    control.request_exit(ExitOutcome::GuestReset);
    assert_eq!(control.outcome(), Some(ExitOutcome::GuestPanic));
    assert_eq!(ExitOutcome::GuestPanic.exit_status().code(), 4);
}

#[test]
fn a_recorded_outcome_is_not_replaced_by_a_later_panic() {
    let control = VmControl::new().unwrap();
    control.request_exit(ExitOutcome::GuestPowerOff);
    PvPanic::new(control.clone()).write(0, &[PVPANIC_PANICKED]);
    assert_eq!(control.outcome(), Some(ExitOutcome::GuestPowerOff));
}

#[test]
fn hostile_pvpanic_writes_are_ignored() {
    let control = VmControl::new().unwrap();
    let mut dev = PvPanic::new(control.clone());
    dev.write(0, &[PVPANIC_CRASH_LOADED]);
    dev.write(0, &[0]);
    dev.write(0, &[0x80]);
    dev.write(0, &[PVPANIC_PANICKED, 0]);
    dev.write(0, &[PVPANIC_PANICKED, 0, 0, 0]);
    dev.write(0, &[]);
    assert_eq!(control.outcome(), None);
    assert_eq!(control.stop_deadline(), None);
    let mut wide = [0xaau8; 4];
    dev.read(0, &mut wide);
    assert_eq!(wide, [0; 4]);
}
