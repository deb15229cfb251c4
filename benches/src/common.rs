//! Arguments and set-up shared by the subcommands.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ksmvm_testkit::RuntimeDir;

use crate::caps::VmmCaps;
use crate::guest::Launcher;
use crate::profile::Profiles;

#[derive(Args, Debug, Clone)]
pub struct VmmArgs {
    /// The ksmvm binary.
    #[arg(long, default_value = "target/release/ksmvm")]
    pub ksmvm: PathBuf,
    /// The probe guest kernel.
    #[arg(long, default_value = "guest-image/probe/target/release/probe")]
    pub probe: PathBuf,
    /// Memory profiles file (default: the built-in benches/profiles.toml).
    #[arg(long)]
    pub profiles: Option<PathBuf>,
    /// The caller already holds the KSM host lock for this run (tests that
    /// hold it while they drive the harness).
    #[arg(long, hide = true)]
    pub assume_host_lock: bool,
}

impl VmmArgs {
    pub fn profiles(&self) -> Result<Profiles> {
        Profiles::load(self.profiles.as_deref())
    }

    pub fn launcher(&self, runtime: &RuntimeDir) -> Result<Launcher> {
        let caps = VmmCaps::detect(&self.ksmvm)?;
        Ok(Launcher {
            ksmvm: self.ksmvm.clone(),
            probe: self.probe.clone(),
            extra_args: Vec::new(),
            env: Vec::new(),
            caps,
            runtime_dir: runtime.path().to_path_buf(),
            api_dir: caps.api_sock.then(|| runtime.path().to_path_buf()),
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct OutArgs {
    /// Where result folders are created (one per run).
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

/// A bar counting `len` steps.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
    {
        b.set_style(style);
    }
    b.set_message(what.to_string());
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

/// A spinner with a message.
pub fn spinner(what: &str) -> ProgressBar {
    let b = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}") {
        b.set_style(style);
    }
    b.set_message(what.to_string());
    b.enable_steady_tick(Duration::from_millis(200));
    b
}
