//! Everything a VM is configured from, in the order data flows:
//! [`Settings`] (the `ksmvm run` flags and an instance file's keys, one
//! type) → [`resolve`] (file overlaid by flags, defaults, validation
//! against [`HostLimits`] and its [`HostCapacity`], once) → [`Instance`],
//! whose [`ValidVmConfig`] the builder takes. Device options (`--disk`, `--net`, `--balloon`) are
//! in [`devices`]; errors name `FILE:LINE:COLUMN: key` or the `--flag`.

pub mod devices;
mod file;
mod host;
mod locate;
mod onoff;
mod ready;
mod resolve;
mod seccomp;
mod settings;
mod vm_config;

pub use file::InstanceFile;
pub use host::{HostCapacity, HostLimits};
pub use onoff::{OnOff, OnOffError};
pub use ready::{ReadyMode, ReadyModeError};
pub use resolve::{
    resolve, Instance, InstanceError, ServiceConfig, DEFAULT_MEM_MIB, DEFAULT_NAME,
    DEFAULT_SERIAL_BURST_KIB, DEFAULT_SERIAL_FILE_MAX_MIB, DEFAULT_SERIAL_RATE_KIB_S,
    DEFAULT_SHUTDOWN_TIMEOUT_S, DEFAULT_VCPUS, MAX_SERIAL_LIMIT, MAX_SHUTDOWN_TIMEOUT_S,
};
pub use seccomp::{SeccompMode, SeccompModeError};
pub use settings::Settings;
pub use vm_config::{
    validate_name, ConfigError, SerialLimits, SerialSink, ValidVmConfig, VmConfig, DEFAULT_CMDLINE,
};

#[cfg(test)]
mod tests;
