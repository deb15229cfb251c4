//! When the VMM tells its service manager that it is ready.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `ready = "running"` (the default): as soon as the vCPUs run.
/// `ready = "guest"`: only once the guest prints `ready_marker` on its
/// serial console, so that units ordered after this one find a booted guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyMode {
    #[default]
    Running,
    Guest,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid ready mode {0:?}: use running or guest")]
pub struct ReadyModeError(String);

impl FromStr for ReadyMode {
    type Err = ReadyModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "running" => Ok(ReadyMode::Running),
            "guest" => Ok(ReadyMode::Guest),
            _ => Err(ReadyModeError(s.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_modes() {
        assert_eq!("running".parse(), Ok(ReadyMode::Running));
        assert_eq!("guest".parse(), Ok(ReadyMode::Guest));
        assert!("booted".parse::<ReadyMode>().is_err());
    }
}
