//! Exclusive use of the host's KSM for one run: the cross-process
//! [`HostLock`], a snapshot of every knob restored at the end (also on
//! error, panic and Ctrl-C, through the settings guard), and the fast
//! tuning that makes KSM converge within seconds.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use ksmvm::ksm::{
    AdvisorMode, HostLock, Ksm, KsmCounters, KsmSettings, KsmSettingsGuard, KsmTuning,
};

use crate::cancel;

/// pages_to_scan that converged within seconds on the development machine
/// (docs: /work/shared/MACHINE.md, "KSM in tests").
pub const FAST_PAGES_TO_SCAN: u64 = 20_000;
pub const FAST_SLEEP_MILLISECS: u64 = 20;

/// The tuning the demo and density runs use while they wait for merging.
pub fn fast_tuning() -> KsmTuning {
    KsmTuning {
        advisor_mode: Some(AdvisorMode::None),
        pages_to_scan: Some(FAST_PAGES_TO_SCAN),
        sleep_millisecs: Some(FAST_SLEEP_MILLISECS),
        enabled: Some(true),
        ..Default::default()
    }
}

#[derive(Debug)]
pub struct KsmSession {
    ksm: Ksm,
    // Field order matters: the guard restores before the lock is released.
    guard: Option<KsmSettingsGuard>,
    _lock: Option<HostLock>,
}

impl KsmSession {
    /// Takes the host lock (unless the caller already holds it on our
    /// behalf) and snapshots every knob.
    pub fn begin(lock_held_by_caller: bool) -> Result<Self> {
        let ksm = Ksm::new();
        let lock = if lock_held_by_caller {
            None
        } else {
            Some(acquire_lock()?)
        };
        let guard = ksm
            .settings_guard()
            .context("saving the host's KSM settings")?;
        Ok(Self {
            ksm,
            guard: Some(guard),
            _lock: lock,
        })
    }

    pub fn ksm(&self) -> &Ksm {
        &self.ksm
    }

    pub fn saved(&self) -> Option<&KsmSettings> {
        self.guard.as_ref().map(|g| g.saved())
    }

    pub fn counters(&self) -> Result<KsmCounters> {
        Ok(self.ksm.counters()?)
    }

    pub fn tune(&self, t: &KsmTuning) -> Result<()> {
        self.ksm.tune(t).context("tuning KSM")
    }

    /// Writes back every saved knob now and reports failures, including
    /// knobs that read back differently (someone else changed them).
    pub fn restore(&mut self) -> Result<()> {
        let Some(g) = self.guard.take() else {
            return Ok(());
        };
        let saved = g.saved().clone();
        g.restore().context("restoring the host's KSM settings")?;
        let now = self.ksm.settings()?;
        let diff = diff_settings(&saved, &now);
        if !diff.is_empty() {
            anyhow::bail!(
                "KSM settings differ from the saved ones after restoring ({}); is another process \
                 changing KSM without taking the host lock?",
                diff.join(", ")
            );
        }
        Ok(())
    }
}

/// Blocks until the lock is ours, staying responsive to Ctrl-C.
fn acquire_lock() -> Result<HostLock> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(HostLock::acquire());
    });
    let mut said = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(lock) => return lock.context("taking the KSM host lock"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                cancel::check()?;
                if !said {
                    said = true;
                    eprintln!(
                        "waiting for the KSM host lock {} (another KSM test or benchmark runs)",
                        HostLock::default_path().display()
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the thread taking the KSM host lock died")
            }
        }
    }
}

/// Field-by-field: which knobs differ between two snapshots.
pub fn diff_settings(a: &KsmSettings, b: &KsmSettings) -> Vec<String> {
    let (ja, jb) = (serde_json::to_value(a), serde_json::to_value(b));
    let (Ok(serde_json::Value::Object(ma)), Ok(serde_json::Value::Object(mb))) = (ja, jb) else {
        return vec!["(cannot compare)".into()];
    };
    ma.iter()
        .filter(|(k, v)| mb.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: {v} -> {}", mb.get(k).cloned().unwrap_or_default()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_tuning_is_valid() {
        fast_tuning().validate().unwrap();
    }

    #[test]
    fn diff_names_changed_knobs() {
        let a = KsmSettings {
            pages_to_scan: Some(100),
            ..Default::default()
        };
        let b = KsmSettings {
            pages_to_scan: Some(20000),
            ..Default::default()
        };
        assert!(diff_settings(&a, &a).is_empty());
        let d = diff_settings(&a, &b);
        assert_eq!(d, vec!["pages_to_scan: 100 -> 20000".to_string()]);
    }
}
