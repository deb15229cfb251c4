use super::*;
use crate::vcpu::PANIC_GRACE;

fn pm() -> (AcpiPm, Arc<VmControl>) {
    let control = VmControl::new().unwrap();
    (AcpiPm::new(control.clone()), control)
}

#[test]
fn s5_powers_off() {
    let (mut dev, control) = pm();
    // Linux clears WAK_STS first, then writes SLP_TYP=5 | SLP_EN.
    dev.write(OFS_SLEEP_STATUS, &[0x80]);
    assert!(!control.stopping());
    dev.write(OFS_SLEEP_CONTROL, &[0x34]);
    assert!(control.stopping());
    assert_eq!(control.outcome(), Some(ExitOutcome::GuestPowerOff));
    assert_eq!(s5_sleep_control_value(), 0x34);
}

#[test]
fn reserved_sleep_control_bits_do_not_matter() {
    let (mut dev, control) = pm();
    dev.write(OFS_SLEEP_CONTROL, &[0x34 | 0xc3]);
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
    // Other sleep types, SLP_TYP without SLP_EN, SLP_EN alone.
    for v in [
        0x20 | (1 << 2),
        0x20 | (3 << 2),
        5 << 2,
        0x20,
        0x00,
        !0x20u8,
    ] {
        dev.write(OFS_SLEEP_CONTROL, &[v]);
    }
    for v in [0u8, 2, 0x06, 0xfe, 0xff] {
        dev.write(OFS_RESET, &[v]);
    }
    // The right values at the wrong width or offset.
    dev.write(OFS_SLEEP_CONTROL, &[0x34, 0]);
    dev.write(OFS_SLEEP_CONTROL, &[0x34, 0, 0, 0]);
    dev.write(OFS_RESET, &[RESET_VALUE, 0]);
    dev.write(OFS_SLEEP_CONTROL, &[]);
    dev.write(OFS_SLEEP_STATUS, &[0x34]);
    dev.write(OFS_SLEEP_STATUS, &[RESET_VALUE]);
    dev.write(3, &[0x34]);
    dev.write(u64::MAX, &[RESET_VALUE]);
    assert!(!control.stopping());
    assert_eq!(control.outcome(), None);
}

#[test]
fn pm_registers_read_zero_at_any_width() {
    let (mut dev, _control) = pm();
    for ofs in [OFS_SLEEP_CONTROL, OFS_SLEEP_STATUS, OFS_RESET, 7] {
        for len in [0, 1, 2, 4, 8] {
            let mut b = vec![0xaa; len];
            dev.read(ofs, &mut b);
            assert!(b.iter().all(|x| *x == 0), "offset {ofs} len {len}");
        }
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
    assert_eq!(ExitOutcome::GuestPanic.exit_status(), 4);
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

#[test]
fn exit_statuses_are_one_mapping() {
    use crate::vcpu::exit_status::*;
    let cases = [
        (ExitOutcome::GuestPowerOff, SUCCESS),
        (ExitOutcome::Stopped("SIGTERM".into()), SUCCESS),
        (ExitOutcome::GuestReset, GUEST_RESET),
        (ExitOutcome::GuestPanic, GUEST_PANIC),
        (ExitOutcome::TripleFault { vcpu: 0, rip: None }, FAILURE),
    ];
    for (outcome, status) in cases {
        assert_eq!(outcome.exit_status(), status, "{outcome}");
    }
    assert_eq!(
        (SUCCESS, FAILURE, BAD_INPUT, GUEST_RESET, GUEST_PANIC),
        (0, 1, 2, 3, 4)
    );
}
