//! Host KSM settings for tests that wait for merging.

use ksmvm::ksm::{Ksm, KsmSettingsGuard, KsmTuning};

/// Saves every KSM knob and starts ksmd scanning fast enough to converge
/// in seconds (MACHINE.md); the guard restores the knobs, also on panic.
/// Callers hold the KSM host lock ([`ksmvm::ksm::HostLock`]).
///
/// # Panics
/// When the knobs cannot be saved or written.
pub fn fast_ksm() -> (Ksm, KsmSettingsGuard) {
    let ksm = Ksm::new();
    let guard = ksm.settings_guard().expect("save KSM settings");
    ksm.tune(&KsmTuning {
        pages_to_scan: Some(20_000),
        sleep_millisecs: Some(20),
        enabled: Some(true),
        ..Default::default()
    })
    .expect("tune KSM");
    (ksm, guard)
}
