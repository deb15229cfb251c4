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
use super::{ConfigError, OnOff, ReadyMode, SerialSink, Settings, ValidVmConfig, VmConfig};

pub const DEFAULT_NAME: &str = "vm";
pub const DEFAULT_MEM_MIB: u64 = 256;
pub const DEFAULT_VCPUS: u32 = 1;
/// sd_notify's EXTEND_TIMEOUT_USEC is a u32 of microseconds (~71 min); an
/// hour keeps the stop timeout we announce representable.
pub const MAX_SHUTDOWN_TIMEOUT_S: u64 = 3600;

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
                file_kind(&m.file_type())
            ),
        )),
        Err(e) => Err(origins.invalid(key, format!("cannot open {what} {}: {e}", path.display()))),
    }
}

/// What a file that is not a regular file is, for errors.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "neither a file nor a device"
    }
}

/// The key a validation error is about.
fn config_error_key(e: &ConfigError) -> &'static str {
    match e {
        ConfigError::Name(_) => "name",
        ConfigError::MemTooSmall { .. } | ConfigError::MemTooLarge { .. } => "mem_mib",
        ConfigError::NoVcpus | ConfigError::TooManyVcpus { .. } => "vcpus",
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
        ksm: s.ksm.unwrap_or(OnOff::On).is_on(),
        devices,
    };
    let vm = vm
        .validate(host)
        .map_err(|e| origins.invalid(config_error_key(&e), e.to_string()))?;

    let timeout_s = s.shutdown_timeout_s.unwrap_or(0);
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
    })
}

impl crate::outcome::HasExitStatus for InstanceError {
    /// Always the user's: their file, their flags.
    fn exit_status(&self) -> crate::outcome::ExitStatus {
        crate::outcome::ExitStatus::BadInput
    }
}
