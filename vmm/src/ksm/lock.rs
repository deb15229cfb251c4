//! A host-wide lock for code that changes KSM knobs (tests, benchmarks):
//! KSM is global, so such runs must not interleave, even across processes.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
        let file = Self::open(path)?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_error(path, errno.into()))?;
        Ok(Self { _lock: lock })
    }

    /// Like [`HostLock::acquire`], but gives up after `timeout` (`Ok(None)`),
    /// e.g. while a long benchmark holds the lock.
    pub fn acquire_within(timeout: Duration) -> Result<Option<Self>, KsmError> {
        Self::acquire_at_within(&Self::default_path(), timeout)
    }

    pub fn acquire_at_within(path: &Path, timeout: Duration) -> Result<Option<Self>, KsmError> {
        let deadline = Instant::now() + timeout;
        let mut file = Self::open(path)?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Some(Self { _lock: lock })),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => file = f,
                Err((_, errno)) => return Err(io_error(path, errno.into())),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }

    fn open(path: &Path) -> Result<File, KsmError> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| io_error(path, e))
    }
}

fn io_error(path: &Path, source: std::io::Error) -> KsmError {
    KsmError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_within_times_out_while_held_and_succeeds_after() {
        let path = std::env::temp_dir().join(format!("ksmvm-lock-test-{}", std::process::id()));
        let held = HostLock::acquire_at(&path).unwrap();
        let t = Instant::now();
        assert!(
            HostLock::acquire_at_within(&path, Duration::from_millis(250))
                .unwrap()
                .is_none()
        );
        assert!(t.elapsed() >= Duration::from_millis(250));
        drop(held);
        assert!(HostLock::acquire_at_within(&path, Duration::from_secs(5))
            .unwrap()
            .is_some());
        let _ = std::fs::remove_file(&path);
    }
}
