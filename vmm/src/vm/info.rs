//! What a running VM is, as the API (`GET /`), `ksmvm list` and the
//! metrics show it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::config::OnOff;

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Paused => "paused",
        })
    }
}

/// `GET /`: what the VM is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub state: VmState,
    /// The VMM process.
    pub pid: u32,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// Path of the guest kernel image.
    pub kernel: String,
    /// Seconds since the vCPUs started.
    pub uptime_s: f64,
    pub ksm: OnOff,
}
