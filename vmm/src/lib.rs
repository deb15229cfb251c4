//! ksmvm: a KSM-aware microVM monitor.
//!
//! Data flows one way (docs/architecture.md): `config` (settings → one
//! validation) → `builder` → `vm` (the running VM and its `VmHandle`) →
//! `vcpu` and `devices`; `api`, `service`, `stats` and `telemetry` serve the
//! hoster from the handle. `arch` holds the x86-64 boot setup, `memory` the
//! guest RAM, `ksm` the host's KSM, `instance` where a running VM lives on
//! the host, `threads` the thread kinds. The command line is the binary's
//! (`src/bin/ksmvm`).

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod instance;
pub mod ksm;
pub mod logger;
pub mod memory;
pub mod outcome;
pub mod seccomp;
pub mod service;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
pub mod threads;
pub mod token_bucket;
pub mod vcpu;
pub mod vm;

// ksmvm runs x86-64 guests on x86-64 hosts: usize is 64 bits, which is
// what makes `usize_of` lossless.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("ksmvm needs a 64-bit target");

/// A u64 length or address as a usize, lossless on the 64-bit targets
/// ksmvm builds for (see the `compile_error!` above).
#[allow(clippy::cast_possible_truncation, reason = "usize is 64 bits here")]
pub const fn usize_of(v: u64) -> usize {
    v as usize
}

/// What a file type is, for errors ("a directory", "a FIFO", ...).
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
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
    } else if t.is_file() {
        "a regular file"
    } else {
        "neither a file nor a device"
    }
}
