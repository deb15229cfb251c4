//! A host-wide lock for code that changes KSM knobs (tests, benchmarks):
//! KSM is global, so such runs must not interleave, even across processes.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::KsmError;

/// Exclusive flock(2) on a lock file; released on drop (or process exit).
#[derive(Debug)]
pub struct HostLock {
    _lock: Flock<File>,
}

impl HostLock {
    /// The lock file every ksmvm test and benchmark agrees on.
    pub fn default_path() -> PathBuf {
        std::env::temp_dir().join("ksmvm-ksm.lock")
    }

    /// Blocks until the lock at [`HostLock::default_path`] is held.
    pub fn acquire() -> Result<Self, KsmError> {
        Self::acquire_at(&Self::default_path())
    }

    pub fn acquire_at(path: &Path) -> Result<Self, KsmError> {
        let io_err = |source| KsmError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_err(errno.into()))?;
        Ok(Self { _lock: lock })
    }
}
