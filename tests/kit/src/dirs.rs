//! Private directories, removed on drop (also when a test panics).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use ksmvm::instance::{socket_path_in, RUNTIME_DIR_ENV};

/// A private temporary directory, removed with its contents on
/// drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `$TMPDIR/ksmvm-TAG-PID-N`, created afresh.
    pub fn create(tag: &str) -> io::Result<TempDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("ksmvm-{tag}-{}-{n}", std::process::id()));
        // A leftover of an earlier process with the same pid.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
        Ok(TempDir { path })
    }

    /// Like [`TempDir::create`], for tests.
    ///
    /// # Panics
    /// When the directory cannot be created.
    pub fn new(tag: &str) -> TempDir {
        TempDir::create(tag).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file name inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A private `KSMVM_RUNTIME_DIR` for the VMMs of one test (or one bench
/// run), so that their API sockets (`NAME.sock`) never meet another test's
/// VMs or the host's /run/ksmvm. It lies under /tmp, as socket paths must be
/// short. Removed on drop.
#[derive(Debug)]
pub struct RuntimeDir(TempDir);

impl RuntimeDir {
    /// `$TMPDIR/ksmvm-TAG-PID-N`.
    pub fn create(tag: &str) -> io::Result<RuntimeDir> {
        TempDir::create(tag).map(RuntimeDir)
    }

    /// A runtime directory for tests.
    ///
    /// # Panics
    /// When the directory cannot be created.
    pub fn new() -> RuntimeDir {
        RuntimeDir(TempDir::new("run"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// The default API socket of VM `name` in this directory.
    pub fn socket(&self, name: &str) -> PathBuf {
        socket_path_in(self.path(), name)
    }

    /// The environment variable that points ksmvm here.
    pub fn env(&self) -> (&'static str, &Path) {
        (RUNTIME_DIR_ENV, self.path())
    }

    /// Runs a ksmvm command against this directory and waits for it.
    pub fn ksmvm(&self, args: &[&str]) -> Output {
        ksmvm_in(self.path(), args)
    }

    /// Like [`RuntimeDir::ksmvm`] but the command must succeed; returns stdout.
    pub fn ksmvm_ok(&self, args: &[&str]) -> String {
        ksmvm_ok_in(self.path(), args)
    }
}

impl Default for RuntimeDir {
    fn default() -> Self {
        RuntimeDir::new()
    }
}

/// Runs a ksmvm command with `KSMVM_RUNTIME_DIR=dir` (stdin closed) and
/// waits for it.
///
/// # Panics
/// When ksmvm cannot be started.
pub fn ksmvm_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(crate::ksmvm())
        .args(args)
        .env(RUNTIME_DIR_ENV, dir)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run ksmvm")
}

/// Like [`ksmvm_in`] but the command must succeed; returns stdout.
///
/// # Panics
/// When the command fails or prints something that is not UTF-8.
pub fn ksmvm_ok_in(dir: &Path, args: &[&str]) -> String {
    let out = ksmvm_in(dir, args);
    assert!(
        out.status.success(),
        "ksmvm {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("ksmvm printed non-UTF-8")
}
