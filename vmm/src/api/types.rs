//! The JSON bodies of the control API, shared by the server and its clients.
//! `GET /` answers the core's [`VmInfo`]; on/off values are the settings'
//! [`OnOff`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::config::OnOff;
pub use crate::vm::{VmInfo, VmState};

/// `GET /balloon`: the balloon's target, what the guest has given, and the
/// guest's latest memory statistics (when the stats queue is on).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalloonInfo {
    pub target_mib: u64,
    pub actual_mib: u64,
    /// Bytes the guest reported free and the host dropped (free page reporting).
    pub reported_bytes: u64,
    /// Bytes the guest reported free but the host kept, because the guest
    /// fills free pages with a non-zero poison value.
    #[serde(default)]
    pub poisoned_report_bytes: u64,
    pub stats: Option<crate::devices::virtio::BalloonStats>,
}

/// `PUT /balloon` body: `{"target_mib": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonRequest {
    pub target_mib: u64,
}

/// `PUT /actions` body: `{"action": "..."}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Stop the VM (the process exits with success).
    Shutdown,
    /// Stop running the vCPUs; memory stays as it is.
    Pause,
    Resume,
    /// MADV_UNMERGEABLE on guest RAM: KSM copies this VM's merged pages back.
    KsmUnmerge,
    /// MADV_MERGEABLE on guest RAM again.
    KsmMerge,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Self::Shutdown,
        Self::Pause,
        Self::Resume,
        Self::KsmUnmerge,
        Self::KsmMerge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::KsmUnmerge => "ksm_unmerge",
            Self::KsmMerge => "ksm_merge",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown action {s:?}"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    pub action: Action,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_round_trip_through_json_and_strings() {
        for a in Action::ALL {
            let json = serde_json::to_string(&ActionRequest { action: a }).unwrap();
            assert_eq!(json, format!(r#"{{"action":"{a}"}}"#));
            let back: ActionRequest = serde_json::from_str(&json).unwrap();
            assert_eq!(back.action, a);
            assert_eq!(a.as_str().parse::<Action>(), Ok(a));
        }
        assert!(serde_json::from_str::<ActionRequest>(r#"{"action":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<ActionRequest>(r#"{"action":"pause","x":1}"#).is_err());
    }

    #[test]
    fn info_uses_lowercase_words() {
        let info = VmInfo {
            name: "a".into(),
            state: VmState::Paused,
            pid: 1,
            vcpus: 1,
            mem_mib: 64,
            kernel: "/k".into(),
            uptime_s: 1.5,
            ksm: OnOff::On,
        };
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["state"], "paused");
        assert_eq!(v["ksm"], "on");
    }
}
