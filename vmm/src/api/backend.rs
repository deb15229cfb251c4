//! What the API needs from a VM. `LiveVm` is the real one; unit tests use
//! fakes, so routing and encoding are tested without KVM.

use crate::memory::MemoryError;
use crate::stats::VmStats;

use super::types::{Action, VmInfo};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot sample statistics: {0}")]
    Stats(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("the VM is shutting down")]
    Stopping,
}

pub trait VmBackend: Send + Sync {
    fn info(&self) -> VmInfo;
    fn stats(&self) -> Result<VmStats, BackendError>;
    fn act(&self, action: Action) -> Result<(), BackendError>;
}

/// Samples a VM's statistics (the `stats` module's sampler in production).
pub trait StatsSource: Send + Sync {
    fn sample(&self) -> Result<VmStats, BackendError>;
}
