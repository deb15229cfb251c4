//! Errors of the CLI views (`list`, `stats`, `top`, `exporter`).

use std::path::PathBuf;

use ksmvm::api::ClientError;
use ksmvm::outcome::{ExitStatus, HasExitStatus};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read the runtime directory {}: {source}", path.display())]
    RuntimeDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] ClientError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ksmvm::config::ConfigError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl HasExitStatus for CliError {
    fn exit_status(&self) -> ExitStatus {
        match self {
            CliError::Config(_) => ExitStatus::BadInput,
            _ => ExitStatus::Failure,
        }
    }
}
