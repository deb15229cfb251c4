//! The VM configuration the builder takes, and its validation: the builder
//! accepts only a [`ValidVmConfig`], which only [`VmConfig::validate`]
//! makes, so every value is checked once, against the host's limits, and
//! bad input gets one clear error before anything is built.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::devices::DeviceSet;
use super::host::{HostCapacity, HostLimits};
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

/// How to ask for a guest above the host's capacity anyway: both
/// spellings, since the error may be about a flag or a file's key.
const OVERCOMMIT_HINT: &str = "--allow-overcommit (allow_overcommit = true) permits it";

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
    #[error(
        "guest memory of {mib} MiB is more than this host can ever back: {host_mib} MiB \
         (MemTotal + SwapTotal); {OVERCOMMIT_HINT}"
    )]
    MemAboveHost { mib: u64, host_mib: u64 },
    #[error("{vcpus} vCPUs requested, but this host has {cpus} online CPUs; {OVERCOMMIT_HINT}")]
    VcpusAboveHost { vcpus: u32, cpus: u32 },
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
    /// Let memory and vCPUs exceed the host's capacity.
    pub allow_overcommit: bool,
    /// The virtio devices.
    pub devices: DeviceSet,
}

impl VmConfig {
    /// Checks every value, the vCPU count against `host`'s KVM limit, and
    /// the guest's size against `host`'s capacity unless overcommit is allowed.
    pub fn validate(self, host: &HostLimits) -> Result<ValidVmConfig, ConfigError> {
        self.check(host.max_vcpus)?;
        if !self.allow_overcommit {
            self.check_capacity(&host.capacity)?;
        }
        Ok(ValidVmConfig(self))
    }

    /// A guest above what the host can ever back; unknown capacity passes.
    fn check_capacity(&self, host: &HostCapacity) -> Result<(), ConfigError> {
        if let Some(host_bytes) = host.mem_bytes {
            if self.mem_bytes() > host_bytes {
                return Err(ConfigError::MemAboveHost {
                    mib: self.mem_mib,
                    host_mib: host_bytes >> 20,
                });
            }
        }
        if let Some(cpus) = host.cpus {
            if self.vcpus > cpus {
                return Err(ConfigError::VcpusAboveHost {
                    vcpus: self.vcpus,
                    cpus,
                });
            }
        }
        Ok(())
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
            allow_overcommit: false,
            devices: DeviceSet::default(),
        }
    }

    /// A host of 1 GiB RAM + 512 MiB swap and 2 CPUs, KVM allowing 8.
    const HOST: HostLimits = HostLimits {
        max_vcpus: 8,
        capacity: HostCapacity {
            mem_bytes: Some(1536 << 20),
            cpus: Some(2),
        },
    };

    #[test]
    fn memory_is_bounded_by_ram_and_swap() {
        let sized = |mem_mib| VmConfig { mem_mib, ..cfg() };
        assert!(sized(1535).validate(&HOST).is_ok(), "below");
        assert!(sized(1536).validate(&HOST).is_ok(), "at");
        let e = sized(1537).validate(&HOST).unwrap_err();
        assert_eq!(
            e,
            ConfigError::MemAboveHost {
                mib: 1537,
                host_mib: 1536
            }
        );
        let msg = e.to_string();
        for part in [
            "1537 MiB",
            "1536 MiB",
            "MemTotal + SwapTotal",
            "--allow-overcommit",
            "allow_overcommit = true",
        ] {
            assert!(msg.contains(part), "{msg:?} lacks {part:?}");
        }
        let over = VmConfig {
            allow_overcommit: true,
            ..sized(4096)
        };
        assert!(over.validate(&HOST).is_ok(), "overcommit allowed");
    }

    #[test]
    fn vcpus_are_bounded_by_online_cpus() {
        let cpus = |vcpus| VmConfig { vcpus, ..cfg() };
        assert!(cpus(1).validate(&HOST).is_ok(), "below");
        assert!(cpus(2).validate(&HOST).is_ok(), "at");
        let e = cpus(3).validate(&HOST).unwrap_err();
        assert_eq!(e, ConfigError::VcpusAboveHost { vcpus: 3, cpus: 2 });
        let msg = e.to_string();
        assert!(
            msg.starts_with("3 vCPUs requested, but this host has 2 online CPUs")
                && msg.contains("--allow-overcommit"),
            "{msg}"
        );
        let over = VmConfig {
            allow_overcommit: true,
            ..cpus(8)
        };
        assert!(over.validate(&HOST).is_ok(), "overcommit allowed");
        // KVM's own limit holds even then.
        let past_kvm = VmConfig {
            allow_overcommit: true,
            ..cpus(9)
        };
        assert!(matches!(
            past_kvm.validate(&HOST),
            Err(ConfigError::TooManyVcpus { vcpus: 9, max: 8 })
        ));
    }

    #[test]
    fn unknown_capacity_is_not_checked() {
        let host = HostLimits {
            capacity: HostCapacity::default(),
            ..HOST
        };
        let big = VmConfig {
            mem_mib: 1 << 20,
            vcpus: 8,
            ..cfg()
        };
        assert!(big.validate(&host).is_ok());
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
