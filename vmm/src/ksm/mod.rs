//! Host KSM control through sysfs (`/sys/kernel/mm/ksm`).
//!
//! KSM is host-global: every write here affects every process on the host.
//! Values a kernel does not provide are `None` (unavailable), never 0.

mod config;
mod error;
mod ksmd;
mod lock;
mod settings;
mod status;
mod sysfs;
mod tune;
mod types;

#[cfg(test)]
pub(crate) mod test_util;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use config::{load as load_tuning_file, parse as parse_tuning};
pub use error::KsmError;
pub use ksmd::{find_ksmd, parse_stat_ticks, KsmdCpu};
pub use lock::HostLock;
pub use settings::{KsmSettings, KsmSettingsGuard};
pub use status::{KsmCounters, KsmStatus};
pub use tune::{
    KsmTuning, ADVISOR_TARGET_SCAN_TIME_RANGE, MAX_PAGE_SHARING_RANGE, PAGES_TO_SCAN_RANGE,
    SLEEP_MILLISECS_RANGE,
};
pub use types::{AdvisorMode, RunMode};

/// Handle on the host's KSM sysfs directory (and /proc, to find ksmd).
///
/// Both roots are injectable so unit tests run against temporary directories.
#[derive(Debug, Clone)]
pub struct Ksm {
    sysfs: PathBuf,
    proc: PathBuf,
}

impl Default for Ksm {
    fn default() -> Self {
        Self::new()
    }
}

impl Ksm {
    pub const SYSFS_ROOT: &'static str = "/sys/kernel/mm/ksm";
    pub const PROC_ROOT: &'static str = "/proc";

    /// The host's real KSM.
    pub fn new() -> Self {
        Self::with_roots(Self::SYSFS_ROOT, Self::PROC_ROOT)
    }

    pub fn with_roots(sysfs: impl Into<PathBuf>, proc: impl Into<PathBuf>) -> Self {
        Self {
            sysfs: sysfs.into(),
            proc: proc.into(),
        }
    }

    pub fn sysfs_root(&self) -> &Path {
        &self.sysfs
    }

    /// Whether the kernel has KSM at all.
    pub fn is_available(&self) -> bool {
        self.sysfs.is_dir()
    }

    fn ensure_available(&self) -> Result<(), KsmError> {
        if self.is_available() {
            Ok(())
        } else {
            Err(KsmError::NotBuiltIn {
                root: self.sysfs.clone(),
            })
        }
    }

    pub fn counters(&self) -> Result<KsmCounters, KsmError> {
        self.ensure_available()?;
        KsmCounters::read(&self.sysfs)
    }

    pub fn settings(&self) -> Result<KsmSettings, KsmError> {
        self.ensure_available()?;
        KsmSettings::read(&self.sysfs)
    }

    pub fn status(&self) -> Result<KsmStatus, KsmError> {
        Ok(KsmStatus {
            counters: self.counters()?,
            settings: self.settings()?,
        })
    }

    /// ksmd's CPU use over `window` (blocks that long); `None` if no ksmd is visible.
    pub fn ksmd_cpu(&self, window: Duration) -> Result<Option<KsmdCpu>, KsmError> {
        ksmd::sample_cpu(&self.proc, window)
    }

    pub fn set_run(&self, mode: RunMode) -> Result<(), KsmError> {
        self.ensure_available()?;
        sysfs::write(&self.sysfs, "run", mode.sysfs_value())
    }

    /// run=1: ksmd starts scanning madvise(MADV_MERGEABLE) memory.
    pub fn enable(&self) -> Result<(), KsmError> {
        self.set_run(RunMode::Run)
    }

    /// run=0: ksmd stops; pages merged so far stay merged.
    pub fn disable(&self) -> Result<(), KsmError> {
        self.set_run(RunMode::Stop)
    }

    /// run=2: ksmd stops and every merged page is copied back (may take
    /// long and needs the memory for all the copies).
    pub fn unmerge_all(&self) -> Result<(), KsmError> {
        self.set_run(RunMode::Unmerge)
    }

    /// Validates and writes the requested knobs.
    pub fn tune(&self, tuning: &KsmTuning) -> Result<(), KsmError> {
        self.ensure_available()?;
        tuning.apply(&self.sysfs)
    }

    /// Applies a TOML tuning file; errors name the file and the key.
    pub fn apply_file(&self, path: &Path) -> Result<KsmTuning, KsmError> {
        let tuning = config::load(path)?;
        self.tune(&tuning).map_err(|source| KsmError::ConfigApply {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(tuning)
    }

    /// Writes back a snapshot from [`Ksm::settings`].
    pub fn restore(&self, saved: &KsmSettings) -> Result<(), KsmError> {
        self.ensure_available()?;
        saved.restore(&self.sysfs)
    }

    /// Snapshots every writable knob and restores them when the guard drops.
    pub fn settings_guard(&self) -> Result<KsmSettingsGuard, KsmError> {
        self.ensure_available()?;
        KsmSettingsGuard::new(self.sysfs.clone())
    }
}

#[cfg(test)]
mod tests;
