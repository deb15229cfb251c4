//! The VM configuration the builder takes, and its validation: the builder
//! accepts only a [`ValidVmConfig`], which only [`VmConfig::validate`]
//! makes, so every value is checked once, against the host's limits, and
//! bad input gets one clear error before anything is built.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::devices::DeviceSet;
use super::host::HostLimits;
use crate::arch::x86_64::layout::{MAX_MEM_MIB, MIN_MEM_MIB};

/// The command line a guest gets when none is given: serial console,
/// reboot through the i8042 (which the VMM sees), no PCI probing.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp";

/// Where guest serial output goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialSink {
    Stdout,
    File(PathBuf),
    None,
}

impl FromStr for SerialSink {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(SerialSink::Stdout),
            "none" => Ok(SerialSink::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialSink::File(PathBuf::from(p))),
                _ => Err(ConfigError::Serial(s.to_owned())),
            },
        }
    }
}

impl TryFrom<String> for SerialSink {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SerialSink> for String {
    fn from(s: SerialSink) -> String {
        match s {
            SerialSink::Stdout => "stdout".into(),
            SerialSink::None => "none".into(),
            SerialSink::File(p) => format!("file:{}", p.display()),
        }
    }
}

/// Bounds on guest serial output (devices::serial): a token bucket and,
/// for `file:` sinks, a size cap with rotation to PATH.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SerialLimits {
    /// Sustained bytes per second; beyond the burst, output is dropped and
    /// counted. 0: no limit.
    pub rate_bytes_s: u64,
    /// Bytes that may come at once above the rate.
    pub burst_bytes: u64,
    /// The most a `file:` sink holds before it is rotated; 0: no cap.
    pub file_max_bytes: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid VM name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with '.' or '-')")]
    Name(String),
    #[error("guest memory of {mib} MiB is too small: at least {MIN_MEM_MIB} MiB")]
    MemTooSmall { mib: u64 },
    #[error(
        "guest memory of {mib} MiB is too large for the memory layout: at most {MAX_MEM_MIB} MiB"
    )]
    MemTooLarge { mib: u64 },
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    #[error("{vcpus} vCPUs requested, but KVM on this host allows at most {max}")]
    TooManyVcpus { vcpus: u32, max: u32 },
    #[error("invalid serial sink {0:?}: use stdout, none or file:PATH")]
    Serial(String),
}

/// Made by `config::resolve` from the settings; serialisable, for a
/// snapshot to record what it was taken of.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmConfig {
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// None means DEFAULT_CMDLINE.
    pub cmdline: Option<String>,
    pub mem_mib: u64,
    pub vcpus: u32,
    pub serial: SerialSink,
    pub serial_limits: SerialLimits,
    /// Mark guest RAM MADV_MERGEABLE.
    pub ksm: bool,
    /// The virtio devices.
    pub devices: DeviceSet,
}

impl VmConfig {
    /// Checks every value, the vCPU count against `host`'s limit.
    pub fn validate(self, host: &HostLimits) -> Result<ValidVmConfig, ConfigError> {
        self.check(host.max_vcpus)?;
        Ok(ValidVmConfig(self))
    }

    fn check(&self, max_vcpus: u32) -> Result<(), ConfigError> {
        validate_name(&self.name)?;
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall { mib: self.mem_mib });
        }
        if self.mem_mib > MAX_MEM_MIB {
            return Err(ConfigError::MemTooLarge { mib: self.mem_mib });
        }
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.vcpus > max_vcpus {
            return Err(ConfigError::TooManyVcpus {
                vcpus: self.vcpus,
                max: max_vcpus,
            });
        }
        Ok(())
    }

    pub fn cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }

    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

/// A [`VmConfig`] that passed [`VmConfig::validate`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidVmConfig(VmConfig);

impl std::ops::Deref for ValidVmConfig {
    type Target = VmConfig;
    fn deref(&self) -> &VmConfig {
        &self.0
    }
}

impl ValidVmConfig {
    pub fn into_inner(self) -> VmConfig {
        self.0
    }
}

pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Name(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            name: "vm0".into(),
            kernel: "/k".into(),
            initrd: None,
            cmdline: None,
            mem_mib: 128,
            vcpus: 1,
            serial: SerialSink::Stdout,
            serial_limits: SerialLimits {
                rate_bytes_s: 0,
                burst_bytes: 0,
                file_max_bytes: 0,
            },
            ksm: true,
            devices: DeviceSet::default(),
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(cfg().check(2), Ok(()));
        let c = VmConfig {
            mem_mib: 1,
            ..cfg()
        };
        assert_eq!(c.check(2), Err(ConfigError::MemTooSmall { mib: 1 }));
        let c = VmConfig {
            mem_mib: MAX_MEM_MIB + 1,
            ..cfg()
        };
        assert!(matches!(c.check(2), Err(ConfigError::MemTooLarge { .. })));
        let c = VmConfig { vcpus: 0, ..cfg() };
        assert_eq!(c.check(2), Err(ConfigError::NoVcpus));
        let c = VmConfig { vcpus: 3, ..cfg() };
        assert_eq!(
            c.check(2).unwrap_err().to_string(),
            "3 vCPUs requested, but KVM on this host allows at most 2"
        );
        for bad in ["", "../x", "a b", ".hidden", "-x", &"n".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_name("mastodon-01.example_a").is_ok());
    }

    #[test]
    fn serial_sink_parses() {
        assert_eq!("stdout".parse(), Ok(SerialSink::Stdout));
        assert_eq!("none".parse(), Ok(SerialSink::None));
        assert_eq!("file:/tmp/x".parse(), Ok(SerialSink::File("/tmp/x".into())));
        assert!("file:".parse::<SerialSink>().is_err());
        assert!("tty".parse::<SerialSink>().is_err());
    }
}
