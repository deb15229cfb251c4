//! `--seccomp on|off|log`: whether the VMM's threads run under their
//! system-call filters (vmm/src/seccomp, docs/security.md).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `on` (the default): a forbidden system call ends the VMM, naming the
/// thread and the call. `log`: the kernel logs forbidden calls and lets
/// them through (for finding what a new code path needs). `off`: no
/// filters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    #[default]
    On,
    Off,
    Log,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid seccomp mode {0:?}: use on, off or log")]
pub struct SeccompModeError(String);

impl FromStr for SeccompMode {
    type Err = SeccompModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(SeccompMode::On),
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            _ => Err(SeccompModeError(s.to_owned())),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_modes_and_nothing_else() {
        for m in [SeccompMode::On, SeccompMode::Off, SeccompMode::Log] {
            assert_eq!(m.to_string().parse(), Ok(m));
        }
        assert!("yes".parse::<SeccompMode>().is_err());
        assert!("ON".parse::<SeccompMode>().is_err());
    }

    #[test]
    fn toml_takes_the_same_words() {
        #[derive(Deserialize)]
        struct T {
            seccomp: SeccompMode,
        }
        let t: T = toml::from_str("seccomp = \"log\"").unwrap();
        assert_eq!(t.seccomp, SeccompMode::Log);
        assert!(toml::from_str::<T>("seccomp = \"strict\"").is_err());
    }
}
