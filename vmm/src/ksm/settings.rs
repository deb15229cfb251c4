//! Snapshot and restore of every writable KSM knob, and a guard that restores
//! on drop (also when a test or benchmark panics).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sysfs::{self, read_bool, read_parsed};
use super::types::{bool_value, AdvisorMode, RunMode};
use super::KsmError;

/// Every writable knob. `None`: this kernel has no such file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KsmSettings {
    pub run: Option<RunMode>,
    pub pages_to_scan: Option<u64>,
    pub sleep_millisecs: Option<u64>,
    pub max_page_sharing: Option<u64>,
    /// Only on NUMA kernels.
    pub merge_across_nodes: Option<bool>,
    pub use_zero_pages: Option<bool>,
    pub stable_node_chains_prune_millisecs: Option<u64>,
    pub advisor_mode: Option<AdvisorMode>,
    /// Seconds.
    pub advisor_target_scan_time: Option<u64>,
    /// Percent of one CPU.
    pub advisor_max_cpu: Option<u64>,
    pub advisor_min_pages_to_scan: Option<u64>,
    pub advisor_max_pages_to_scan: Option<u64>,
    pub smart_scan: Option<bool>,
}

impl KsmSettings {
    pub(crate) fn read(root: &Path) -> Result<Self, KsmError> {
        Ok(Self {
            run: read_parsed(root, "run")?,
            pages_to_scan: read_parsed(root, "pages_to_scan")?,
            sleep_millisecs: read_parsed(root, "sleep_millisecs")?,
            max_page_sharing: read_parsed(root, "max_page_sharing")?,
            merge_across_nodes: read_bool(root, "merge_across_nodes")?,
            use_zero_pages: read_bool(root, "use_zero_pages")?,
            stable_node_chains_prune_millisecs: read_parsed(
                root,
                "stable_node_chains_prune_millisecs",
            )?,
            advisor_mode: read_advisor_mode(root)?,
            advisor_target_scan_time: read_parsed(root, "advisor_target_scan_time")?,
            advisor_max_cpu: read_parsed(root, "advisor_max_cpu")?,
            advisor_min_pages_to_scan: read_parsed(root, "advisor_min_pages_to_scan")?,
            advisor_max_pages_to_scan: read_parsed(root, "advisor_max_pages_to_scan")?,
            smart_scan: read_bool(root, "smart_scan")?,
        })
    }

    /// Writes back every saved knob that differs from the current value.
    ///
    /// Only differing knobs are written because max_page_sharing and
    /// merge_across_nodes fail with EBUSY while pages are merged even when
    /// the value would not change anything. Every knob is attempted; the
    /// failures are reported together.
    pub(crate) fn restore(&self, root: &Path) -> Result<(), KsmError> {
        let now = Self::read(root)?;
        let mut r = Restorer {
            root,
            failures: Vec::new(),
        };
        // Advisor parameters are plain values in every mode.
        r.num(
            "advisor_target_scan_time",
            self.advisor_target_scan_time,
            now.advisor_target_scan_time,
        );
        r.num("advisor_max_cpu", self.advisor_max_cpu, now.advisor_max_cpu);
        r.num(
            "advisor_min_pages_to_scan",
            self.advisor_min_pages_to_scan,
            now.advisor_min_pages_to_scan,
        );
        r.num(
            "advisor_max_pages_to_scan",
            self.advisor_max_pages_to_scan,
            now.advisor_max_pages_to_scan,
        );
        // The kernel rejects pages_to_scan unless the advisor is off, and
        // resets pages_to_scan whenever the advisor mode changes: so the
        // mode is switched first and pages_to_scan compared afterwards.
        match self.advisor_mode {
            Some(AdvisorMode::ScanTime) => {
                r.advisor(AdvisorMode::ScanTime, now.advisor_mode);
            }
            Some(AdvisorMode::None) | None => {
                if let Some(saved) = self.advisor_mode {
                    r.advisor(saved, now.advisor_mode);
                }
                match read_parsed::<u64>(root, "pages_to_scan") {
                    Ok(cur) => r.num("pages_to_scan", self.pages_to_scan, cur),
                    Err(e) => r.failures.push(("pages_to_scan", e)),
                }
            }
        }
        r.num("sleep_millisecs", self.sleep_millisecs, now.sleep_millisecs);
        r.num(
            "stable_node_chains_prune_millisecs",
            self.stable_node_chains_prune_millisecs,
            now.stable_node_chains_prune_millisecs,
        );
        r.flag("use_zero_pages", self.use_zero_pages, now.use_zero_pages);
        r.flag("smart_scan", self.smart_scan, now.smart_scan);
        r.num(
            "max_page_sharing",
            self.max_page_sharing,
            now.max_page_sharing,
        );
        r.flag(
            "merge_across_nodes",
            self.merge_across_nodes,
            now.merge_across_nodes,
        );
        // Last, so ksmd does not run with a half-restored configuration.
        if let (Some(saved), cur) = (self.run, now.run) {
            if cur != Some(saved) {
                r.put("run", saved.sysfs_value());
            }
        }
        if r.failures.is_empty() {
            Ok(())
        } else {
            Err(KsmError::Restore {
                failures: r.failures,
            })
        }
    }
}

fn read_advisor_mode(root: &Path) -> Result<Option<AdvisorMode>, KsmError> {
    let Some(content) = sysfs::read(root, "advisor_mode")? else {
        return Ok(None);
    };
    sysfs::selected_choice(&content)
        .and_then(|word| word.parse().ok())
        .map(Some)
        .ok_or_else(|| KsmError::Parse {
            path: root.join("advisor_mode"),
            content,
        })
}

struct Restorer<'a> {
    root: &'a Path,
    failures: Vec<(&'static str, KsmError)>,
}

impl Restorer<'_> {
    fn put(&mut self, knob: &'static str, value: &str) {
        if let Err(e) = sysfs::write(self.root, knob, value) {
            self.failures.push((knob, e));
        }
    }

    fn num(&mut self, knob: &'static str, saved: Option<u64>, now: Option<u64>) {
        if let Some(v) = saved.filter(|v| now != Some(*v)) {
            self.put(knob, &v.to_string());
        }
    }

    fn flag(&mut self, knob: &'static str, saved: Option<bool>, now: Option<bool>) {
        if let Some(v) = saved.filter(|v| now != Some(*v)) {
            self.put(knob, bool_value(v));
        }
    }

    fn advisor(&mut self, saved: AdvisorMode, now: Option<AdvisorMode>) {
        if now != Some(saved) {
            self.put("advisor_mode", saved.sysfs_value());
        }
    }
}

/// Restores the KSM settings it saved when dropped, including during a panic.
///
/// Holds no lock: tests that change KSM also need [`super::HostLock`] so that
/// they do not interleave with each other.
#[must_use = "the settings are restored when the guard is dropped"]
#[derive(Debug)]
pub struct KsmSettingsGuard {
    root: PathBuf,
    saved: KsmSettings,
    armed: bool,
}

impl KsmSettingsGuard {
    pub(crate) fn new(root: PathBuf) -> Result<Self, KsmError> {
        let saved = KsmSettings::read(&root)?;
        Ok(Self {
            root,
            saved,
            armed: true,
        })
    }

    pub fn saved(&self) -> &KsmSettings {
        &self.saved
    }

    /// Restores now and reports failures instead of only logging them.
    pub fn restore(mut self) -> Result<(), KsmError> {
        self.armed = false;
        self.saved.restore(&self.root)
    }
}

impl Drop for KsmSettingsGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.saved.restore(&self.root) {
                log::error!("restoring KSM settings: {e}");
                // Also to stderr: tests and benchmarks often run without a logger.
                eprintln!("ksmvm: restoring KSM settings: {e}");
            }
        }
    }
}
