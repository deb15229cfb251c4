//! Errors of per-VM statistics sampling.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StatsError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("unexpected line in {file}: {line:?}")]
    Parse { file: &'static str, line: String },

    #[error("invalid guest RAM region at {start:#x} (length {len:#x}): {problem}")]
    Region {
        start: u64,
        len: u64,
        problem: &'static str,
    },
}
