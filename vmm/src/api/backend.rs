//! What the API needs from a VM. The running VM's `VmHandle` is the real
//! one (`live.rs`); unit tests use fakes, so routing and encoding are
//! tested without KVM.

use crate::memory::MemoryError;
use crate::stats::VmStats;

use super::types::{Action, BalloonInfo, VmInfo};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot sample statistics: {0}")]
    Stats(String),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("the VM is shutting down")]
    Stopping,
    #[error("this VM has no balloon device (start it with --balloon)")]
    NoBalloon,
    #[error("invalid balloon target: {0}")]
    BalloonTarget(String),
    #[error("{0}")]
    Vm(String),
}

pub trait VmBackend: Send + Sync {
    fn info(&self) -> VmInfo;
    fn stats(&self) -> Result<VmStats, BackendError>;
    fn act(&self, action: Action) -> Result<(), BackendError>;
    fn balloon(&self) -> Result<BalloonInfo, BackendError> {
        Err(BackendError::NoBalloon)
    }
    fn set_balloon(&self, _target_mib: u64) -> Result<(), BackendError> {
        Err(BackendError::NoBalloon)
    }
}
