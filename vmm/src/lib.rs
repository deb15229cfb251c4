//! ksmvm: a KSM-aware microVM monitor.
//!
//! The crate is split the way rust-vmm's vmm-reference and Firecracker split
//! theirs: `arch` holds x86-64 boot setup, `memory` the guest RAM, `vcpu` the
//! vCPU threads, `devices` the emulated hardware, `vm`/`builder` assemble a VM
//! from a validated `config`, and `stats`, `ksm` and `api` serve the hoster.

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
pub mod service;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
pub mod threads;
pub mod vcpu;
pub mod vm;
