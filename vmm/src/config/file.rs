//! An instance file (`/etc/ksmvm/NAME.toml`), parsed into [`Settings`]
//! and kept with its text, so that every error names `FILE:LINE:COLUMN:
//! key`, also for values found bad only later (a value out of range).

use std::path::{Path, PathBuf};

use super::locate;
use super::resolve::InstanceError;
use super::Settings;

/// A parsed instance file, kept with its text so that errors found later
/// (a value out of range) can still point at the line.
#[derive(Debug, Clone)]
pub struct InstanceFile {
    pub path: PathBuf,
    text: String,
    pub settings: Settings,
}

impl InstanceFile {
    pub fn load(path: &Path) -> Result<Self, InstanceError> {
        let text = std::fs::read_to_string(path).map_err(|source| InstanceError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, text)
    }

    pub fn parse(path: &Path, text: String) -> Result<Self, InstanceError> {
        let mut settings: Settings = toml::from_str(&text).map_err(|e| {
            let at = match e.span() {
                Some(span) => {
                    let key = locate::key_at(&text, span.start);
                    with_key(location(path, &text, span.start), key.as_deref())
                }
                None => path.display().to_string(),
            };
            InstanceError::Invalid {
                at,
                message: e.message().trim_end().to_owned(),
            }
        })?;
        if let Some(dir) = path.parent() {
            settings.anchor_paths(dir);
        }
        Ok(Self {
            path: path.to_path_buf(),
            text,
            settings,
        })
    }

    /// `FILE:LINE:COLUMN: key` of a key's value (`mem_mib`, `disk[1].path`).
    pub(super) fn at_key(&self, key: &str) -> String {
        match locate::value_span(&self.text, key) {
            Some(span) => with_key(location(&self.path, &self.text, span.start), Some(key)),
            None => format!("{}: {key}", self.path.display()),
        }
    }

    /// The instance name a file implies: its file name without `.toml`.
    pub fn default_name(&self) -> Option<String> {
        self.path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_owned)
    }
}

fn location(path: &Path, text: &str, offset: usize) -> String {
    let (line, column) = locate::line_col(text, offset);
    format!("{}:{line}:{column}", path.display())
}

fn with_key(at: String, key: Option<&str>) -> String {
    match key {
        Some(k) => format!("{at}: {k}"),
        None => at,
    }
}
