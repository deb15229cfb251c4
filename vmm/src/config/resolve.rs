//! Resolution: the instance file's settings overlaid by the flags, the
//! defaults filled in, and every value validated once, into the
//! [`ValidVmConfig`] the builder takes plus the settings for the VMM's life
//! as a service.
//!
//! Every error names where the bad value came from: `FILE:LINE:COLUMN: key`
//! for the file, `--flag` for the command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::devices::DeviceSet;
use super::file::InstanceFile;
use super::host::HostLimits;
use super::{
    ConfigError, OnOff, ReadyMode, SeccompMode, SerialLimits, SerialSink, Settings, ValidVmConfig,
    VmConfig,
};

pub const DEFAULT_NAME: &str = "vm";
pub const DEFAULT_MEM_MIB: u64 = 256;
pub const DEFAULT_VCPUS: u32 = 1;
/// A guest asked to shut down (SIGTERM: Ctrl-Alt-Del) gets this long: what
/// a Linux guest under systemd needs to stop its services and sync, and
/// what ksmvm@.service's TimeoutStopSec= leaves room for.
pub const DEFAULT_SHUTDOWN_TIMEOUT_S: u64 = 30;
/// sd_notify's EXTEND_TIMEOUT_USEC is a u32 of microseconds (~71 min); an
/// hour keeps the stop timeout we announce representable.
pub const MAX_SHUTDOWN_TIMEOUT_S: u64 = 3600;
/// Guest serial output: 64 KiB/s sustained is several times what a booting
/// Linux writes (a 115200-baud UART carries 11 KiB/s); a 256 KiB burst
/// takes a whole chatty boot log at once.
pub const DEFAULT_SERIAL_RATE_KIB_S: u64 = 64;
pub const DEFAULT_SERIAL_BURST_KIB: u64 = 256;
/// A `file:` sink keeps 16 MiB in PATH and 16 MiB in PATH.1.
pub const DEFAULT_SERIAL_FILE_MAX_MIB: u64 = 16;
/// The largest value of each serial bound (KiB/s, KiB, MiB): 1 GiB/s, a
/// 1 GiB burst, a 1 TiB file; above that, 0 (no limit) is what is meant.
pub const MAX_SERIAL_LIMIT: u64 = 1 << 20;

/// How the VMM behaves as a (systemd) service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// How long a guest asked to shut down (SIGTERM) may take before the VM
    /// is stopped; zero stops the VM at once without asking.
    pub shutdown_timeout: Duration,
    pub ready: ReadyMode,
    /// Serial output that means "the guest is up" (with `ReadyMode::Guest`).
    pub ready_marker: Option<String>,
}

/// A fully resolved and validated instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub vm: ValidVmConfig,
    /// The control API socket: `api_sock`, else RUNTIME_DIR/NAME.sock.
    pub api_sock: PathBuf,
    pub service: ServiceConfig,
    /// The VMM threads' system-call filters.
    pub seccomp: SeccompMode,
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot read instance file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `at` is `FILE:LINE:COLUMN: key`, `FILE`, or `--flag`.
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
}

/// Names where a key's value came from: the flag when one was given, else
/// the file.
struct Origins<'a> {
    file: Option<&'a InstanceFile>,
    flags: &'a Settings,
}

impl Origins<'_> {
    /// `key` may be a path (`disk[1].path`): the flag is its first part's.
    fn at(&self, key: &str) -> String {
        let top = key.split(['.', '[']).next().unwrap_or(key);
        match self.file {
            Some(f) if !self.flags.has(top) => f.at_key(key),
            _ => format!("--{}", top.replace('_', "-")),
        }
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> InstanceError {
        InstanceError::Invalid {
            at: self.at(key),
            message: message.into(),
        }
    }
}

/// Checks that a file the VM needs exists: a regular file, or for a disk
/// also a block device. Symlinks are followed (the VM uses the target).
fn check_file(origins: &Origins, key: &str, what: &str, path: &Path) -> Result<(), InstanceError> {
    use std::os::unix::fs::FileTypeExt;
    let wanted = if what == "disk" {
        "a regular file or block device"
    } else {
        "a regular file"
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || (what == "disk" && m.file_type().is_block_device()) => Ok(()),
        Ok(m) => Err(origins.invalid(
            key,
            format!(
                "cannot open {what} {}: it is {}, not {wanted}",
                path.display(),
                crate::file_kind(&m.file_type())
            ),
        )),
        Err(e) => Err(origins.invalid(key, format!("cannot open {what} {}: {e}", path.display()))),
    }
}

/// The serial output bounds, validated.
fn serial_limits(origins: &Origins, s: &Settings) -> Result<SerialLimits, InstanceError> {
    let rate = s.serial_rate_kib_s.unwrap_or(DEFAULT_SERIAL_RATE_KIB_S);
    let burst = s.serial_burst_kib.unwrap_or(DEFAULT_SERIAL_BURST_KIB);
    let file_max = s.serial_file_max_mib.unwrap_or(DEFAULT_SERIAL_FILE_MAX_MIB);
    let too_large = |key: &str, v: u64, unit: &str| {
        origins.invalid(
            key,
            format!("{v} {unit} is too large: at most {MAX_SERIAL_LIMIT} {unit} (0: no limit)"),
        )
    };
    if rate > MAX_SERIAL_LIMIT {
        return Err(too_large("serial_rate_kib_s", rate, "KiB/s"));
    }
    if burst > MAX_SERIAL_LIMIT {
        return Err(origins.invalid(
            "serial_burst_kib",
            format!("{burst} KiB is too large: at most {MAX_SERIAL_LIMIT} KiB"),
        ));
    }
    if burst == 0 && rate > 0 {
        return Err(origins.invalid(
            "serial_burst_kib",
            "a burst of 0 KiB lets no serial output through: at least 1 KiB \
             (serial = \"none\" discards it all, serial_rate_kib_s = 0 lifts the limit)",
        ));
    }
    if file_max > MAX_SERIAL_LIMIT {
        return Err(too_large("serial_file_max_mib", file_max, "MiB"));
    }
    Ok(SerialLimits {
        rate_bytes_s: rate << 10,
        burst_bytes: burst << 10,
        file_max_bytes: file_max << 20,
    })
}

/// The key a validation error is about.
fn config_error_key(e: &ConfigError) -> &'static str {
    match e {
        ConfigError::Name(_) => "name",
        ConfigError::MemTooSmall { .. }
        | ConfigError::MemTooLarge { .. }
        | ConfigError::MemAboveHost { .. } => "mem_mib",
        ConfigError::NoVcpus
        | ConfigError::TooManyVcpus { .. }
        | ConfigError::VcpusAboveHost { .. } => "vcpus",
        ConfigError::Serial(_) => "serial",
    }
}

/// Overlays `flags` on the file's settings, fills in defaults and checks
/// everything that can be checked without starting a VM, against `host`.
pub fn resolve(
    file: Option<&InstanceFile>,
    flags: Settings,
    host: &HostLimits,
) -> Result<Instance, InstanceError> {
    let origins = Origins {
        file,
        flags: &flags,
    };
    let base = file.map(|f| f.settings.clone()).unwrap_or_default();
    let s = base.overlay(flags.clone());
    let devices = DeviceSet::from_settings(&s);
    let serial_limits = serial_limits(&origins, &s)?;

    let Some(kernel) = s.kernel else {
        return Err(InstanceError::Invalid {
            at: file.map_or_else(|| "ksmvm run".into(), |f| f.path.display().to_string()),
            message: "no guest kernel: set `kernel` in the instance file or give --kernel".into(),
        });
    };
    check_file(&origins, "kernel", "kernel", &kernel)?;
    if let Some(initrd) = &s.initrd {
        check_file(&origins, "initrd", "initrd", initrd)?;
    }
    for (i, d) in devices.disks.iter().enumerate() {
        check_file(&origins, &format!("disk[{i}].path"), "disk", &d.path)?;
    }

    let name = s
        .name
        .or_else(|| file.and_then(InstanceFile::default_name))
        .unwrap_or_else(|| DEFAULT_NAME.to_owned());
    let vm = VmConfig {
        name,
        kernel,
        initrd: s.initrd,
        cmdline: s.cmdline,
        mem_mib: s.mem_mib.unwrap_or(DEFAULT_MEM_MIB),
        vcpus: s.vcpus.unwrap_or(DEFAULT_VCPUS),
        serial: s.serial.unwrap_or(SerialSink::Stdout),
        serial_limits,
        ksm: s.ksm.unwrap_or(OnOff::On).is_on(),
        allow_overcommit: s.allow_overcommit.unwrap_or(OnOff::Off).is_on(),
        devices,
    };
    let vm = vm
        .validate(host)
        .map_err(|e| origins.invalid(config_error_key(&e), e.to_string()))?;

    let timeout_s = s.shutdown_timeout_s.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_S);
    if timeout_s > MAX_SHUTDOWN_TIMEOUT_S {
        return Err(origins.invalid(
            "shutdown_timeout_s",
            format!("{timeout_s} s is too long: at most {MAX_SHUTDOWN_TIMEOUT_S} s"),
        ));
    }
    let ready = s.ready.unwrap_or_default();
    match (&s.ready_marker, ready) {
        (Some(m), _) if m.is_empty() => {
            return Err(origins.invalid("ready_marker", "the ready marker must not be empty"))
        }
        (None, ReadyMode::Guest) => {
            return Err(origins.invalid(
                "ready",
                "ready = \"guest\" needs a ready_marker: the text the guest prints on its serial console once it is up",
            ))
        }
        _ => {}
    }
    let api_sock = s
        .api_sock
        .unwrap_or_else(|| crate::instance::socket_path(&vm.name));
    Ok(Instance {
        vm,
        api_sock,
        service: ServiceConfig {
            shutdown_timeout: Duration::from_secs(timeout_s),
            ready,
            ready_marker: s.ready_marker,
        },
        seccomp: s.seccomp.unwrap_or_default(),
    })
}

impl crate::outcome::HasExitStatus for InstanceError {
    /// Always the user's: their file, their flags.
    fn exit_status(&self) -> crate::outcome::ExitStatus {
        crate::outcome::ExitStatus::BadInput
    }
}
