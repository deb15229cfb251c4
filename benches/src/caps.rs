//! What the ksmvm binary under test supports, from `ksmvm run --help`:
//! the harness works with the binary of its own branch and with later ones.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VmmCaps {
    /// `--ksm on|off` takes a value (older binaries: a flag that is always on).
    pub ksm_value: bool,
    /// `--api-sock PATH` (the control API).
    pub api_sock: bool,
    /// `--shutdown-timeout-s N`: the harness passes 0, because the probe
    /// ignores Ctrl-Alt-Del and a SIGTERM would otherwise wait out the
    /// default (30 s) before the VM stops.
    pub shutdown_timeout: bool,
}

impl VmmCaps {
    pub fn detect(ksmvm: &Path) -> Result<Self> {
        let out = Command::new(ksmvm)
            .args(["run", "--help"])
            .output()
            .with_context(|| format!("running {} run --help", ksmvm.display()))?;
        Ok(Self::from_help(&String::from_utf8_lossy(&out.stdout)))
    }

    pub fn from_help(help: &str) -> Self {
        Self {
            ksm_value: help.contains("--ksm <"),
            api_sock: help.contains("--api-sock"),
            shutdown_timeout: help.contains("--shutdown-timeout-s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_help_text() {
        let old = "      --ksm                    Mark guest memory MADV_MERGEABLE for KSM\n";
        assert_eq!(VmmCaps::from_help(old), VmmCaps::default());
        let new = "      --ksm <KSM>   on or off\n      --api-sock <API_SOCK>\n      --shutdown-timeout-s <S>\n";
        let c = VmmCaps::from_help(new);
        assert!(c.ksm_value && c.api_sock && c.shutdown_timeout);
    }
}
