//! Errors of host KSM control, worded so an operator can act on them.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum KsmError {
    #[error("KSM is not available: {root} does not exist (kernel built without CONFIG_KSM?)")]
    NotBuiltIn { root: PathBuf },

    #[error("permission denied on {path}: changing KSM settings needs root (CAP_SYS_ADMIN) and a writable sysfs")]
    PermissionDenied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("this kernel has no KSM knob `{knob}` ({path} is missing)")]
    KnobMissing { knob: &'static str, path: PathBuf },

    #[error("the kernel refused {knob}={value} (EBUSY): it can only be changed while no pages are merged; unmerge first (`ksmvm ksm disable --unmerge`, i.e. run=2)")]
    Busy { knob: &'static str, value: String },

    #[error("the kernel rejected {knob}={value}: {source}")]
    Rejected {
        knob: &'static str,
        value: String,
        #[source]
        source: io::Error,
    },

    #[error("{knob}: {problem}")]
    InvalidValue { knob: &'static str, problem: String },

    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("unexpected content in {path}: {content:?}")]
    Parse { path: PathBuf, content: String },

    #[error("{path}: {source}")]
    ConfigSyntax {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },

    #[error("{path}: key `{key}`: {problem}")]
    ConfigInvalid {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },

    /// The inner error names the key (knob) that failed.
    #[error("{path}: {source}")]
    ConfigApply {
        path: PathBuf,
        #[source]
        source: Box<KsmError>,
    },

    #[error("cannot read {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("could not restore {} KSM knob(s): {}", failures.len(), describe(failures))]
    Restore {
        failures: Vec<(&'static str, KsmError)>,
    },
}

fn describe(failures: &[(&'static str, KsmError)]) -> String {
    failures
        .iter()
        .map(|(knob, err)| format!("{knob} ({err})"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl KsmError {
    /// The knob a write error is about, for callers that add context.
    pub fn knob(&self) -> Option<&'static str> {
        match self {
            Self::KnobMissing { knob, .. }
            | Self::Busy { knob, .. }
            | Self::Rejected { knob, .. }
            | Self::InvalidValue { knob, .. } => Some(knob),
            _ => None,
        }
    }
}

impl crate::outcome::HasExitStatus for KsmError {
    /// A tuning file or value the user can fix is bad input; the rest is
    /// the host's.
    fn exit_status(&self) -> crate::outcome::ExitStatus {
        use crate::outcome::ExitStatus::{BadInput, Failure};
        match self {
            KsmError::InvalidValue { .. }
            | KsmError::ConfigSyntax { .. }
            | KsmError::ConfigInvalid { .. }
            | KsmError::ConfigRead { .. } => BadInput,
            KsmError::ConfigApply { source, .. } => source.exit_status(),
            _ => Failure,
        }
    }
}
