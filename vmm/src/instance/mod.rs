//! Instance configuration: the TOML file `ksmvm run --config FILE` reads,
//! overlaid by the flags given with it, resolved into the `VmConfig` the
//! builder takes plus the settings for the VMM's life as a service.
//!
//! Every error names where the bad value came from: `FILE:LINE:COLUMN: key`
//! for the file, `--flag` for the command line.

mod locate;
mod ready;
mod settings;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use ready::{ReadyMode, ReadyModeError};
pub use settings::Settings;

use crate::config::{ConfigError, VmConfig};

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
    pub vm: VmConfig,
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

/// A parsed instance file, kept with its text so that errors found later
/// (a value out of range) can still point at the line.
#[derive(Debug, Clone)]
pub struct InstanceFile {
    pub path: PathBuf,
    text: String,
    pub settings: Settings,
}

impl InstanceFile {
    pub fn load(path: &Path) -> Result<Self, InstanceError> {
        let text = std::fs::read_to_string(path).map_err(|source| InstanceError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, text)
    }

    pub fn parse(path: &Path, text: String) -> Result<Self, InstanceError> {
        let mut settings: Settings = toml::from_str(&text).map_err(|e| {
            let at = match e.span() {
                Some(span) => {
                    let key = locate::key_at(&text, span.start);
                    with_key(location(path, &text, span.start), key.as_deref())
                }
                None => path.display().to_string(),
            };
            InstanceError::Invalid {
                at,
                message: e.message().trim_end().to_owned(),
            }
        })?;
        if let Some(dir) = path.parent() {
            settings.anchor_paths(dir);
        }
        Ok(Self {
            path: path.to_path_buf(),
            text,
            settings,
        })
    }

    /// `FILE:LINE:COLUMN: key` of a key's value (`mem_mib`, `disk[1].path`).
    fn at_key(&self, key: &str) -> String {
        match locate::value_span(&self.text, key) {
            Some(span) => with_key(location(&self.path, &self.text, span.start), Some(key)),
            None => format!("{}: {key}", self.path.display()),
        }
    }

    /// The instance name a file implies: its file name without `.toml`.
    pub fn default_name(&self) -> Option<String> {
        self.path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_owned)
    }
}

fn location(path: &Path, text: &str, offset: usize) -> String {
    let (line, column) = locate::line_col(text, offset);
    format!("{}:{line}:{column}", path.display())
}

fn with_key(at: String, key: Option<&str>) -> String {
    match key {
        Some(k) => format!("{at}: {k}"),
        None => at,
    }
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
/// also a block device.
fn check_file(origins: &Origins, key: &str, what: &str, path: &Path) -> Result<(), InstanceError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || (what == "disk" && m.file_type().is_block_device()) => Ok(()),
        Ok(_) => Err(origins.invalid(
            key,
            format!("cannot open {what} {}: not a regular file", path.display()),
        )),
        Err(e) => Err(origins.invalid(key, format!("cannot open {what} {}: {e}", path.display()))),
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
/// everything that can be checked without starting a VM. `max_vcpus` is
/// the host's limit (KVM's, or the MP table's when KVM is not at hand).
pub fn resolve(
    file: Option<&InstanceFile>,
    flags: Settings,
    max_vcpus: u32,
) -> Result<Instance, InstanceError> {
    let origins = Origins {
        file,
        flags: &flags,
    };
    let base = file.map(|f| f.settings.clone()).unwrap_or_default();
    let s = base.overlay(flags.clone());

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
    let disks = s.disk.unwrap_or_default();
    for (i, d) in disks.iter().enumerate() {
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
        serial: s.serial.unwrap_or(crate::config::SerialSink::Stdout),
        ksm: s.ksm.unwrap_or(true),
        disks,
        nets: s.net.unwrap_or_default(),
        balloon: s.balloon,
        rng: s.rng.unwrap_or(true),
    };
    vm.validate(max_vcpus)
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
        .unwrap_or_else(|| crate::api::socket_path(&vm.name));
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

#[cfg(test)]
mod tests;
