//! A private runtime directory per harness run (`KSMVM_RUNTIME_DIR` of its
//! guests), so that API sockets of concurrent runs never collide; removed
//! at the end.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub const RUNTIME_DIR_ENV: &str = "KSMVM_RUNTIME_DIR";

pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    pub fn create(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("ksmvm-bench-{tag}-{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn env(&self) -> (String, String) {
        (RUNTIME_DIR_ENV.to_string(), self.path.display().to_string())
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
