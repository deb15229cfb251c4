//! Reading and writing single files of the KSM sysfs directory, with errno
//! mapped to the cause an operator needs to know.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::str::FromStr;

use super::KsmError;

/// Reads one knob; `Ok(None)` when this kernel lacks the file.
pub(crate) fn read(root: &Path, name: &str) -> Result<Option<String>, KsmError> {
    let path = root.join(name);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if root.exists() {
                Ok(None)
            } else {
                Err(KsmError::NotBuiltIn {
                    root: root.to_path_buf(),
                })
            }
        }
        Err(source) => Err(KsmError::Io { path, source }),
    }
}

/// Reads and parses one knob; `Ok(None)` when this kernel lacks the file.
pub(crate) fn read_parsed<T: FromStr>(root: &Path, name: &str) -> Result<Option<T>, KsmError> {
    read(root, name)?
        .map(|s| {
            s.parse().map_err(|_| KsmError::Parse {
                path: root.join(name),
                content: s,
            })
        })
        .transpose()
}

/// Reads a 0/1 knob as a bool.
pub(crate) fn read_bool(root: &Path, name: &str) -> Result<Option<bool>, KsmError> {
    read_parsed::<u8>(root, name)?
        .map(|v| match v {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(KsmError::Parse {
                path: root.join(name),
                content: other.to_string(),
            }),
        })
        .transpose()
}

/// Writes one knob in a single write(2), as sysfs requires.
pub(crate) fn write(root: &Path, knob: &'static str, value: &str) -> Result<(), KsmError> {
    let path = root.join(knob);
    // No O_CREAT: a missing knob must fail, not appear (matters for test roots).
    // O_TRUNC is harmless on sysfs and keeps plain files in test roots exact.
    let mut file = match OpenOptions::new().write(true).truncate(true).open(&path) {
        Ok(f) => f,
        Err(e) => return Err(open_error(root, knob, path.as_path(), e)),
    };
    file.write_all(value.as_bytes())
        .map_err(|e| write_error(knob, value, path.as_path(), e))
}

fn is_permission(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS)
    )
}

fn open_error(root: &Path, knob: &'static str, path: &Path, e: io::Error) -> KsmError {
    if e.kind() == io::ErrorKind::NotFound {
        if root.exists() {
            KsmError::KnobMissing {
                knob,
                path: path.to_path_buf(),
            }
        } else {
            KsmError::NotBuiltIn {
                root: root.to_path_buf(),
            }
        }
    } else if is_permission(&e) {
        KsmError::PermissionDenied {
            path: path.to_path_buf(),
            source: e,
        }
    } else {
        KsmError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

fn write_error(knob: &'static str, value: &str, path: &Path, e: io::Error) -> KsmError {
    if e.raw_os_error() == Some(libc::EBUSY) {
        KsmError::Busy {
            knob,
            value: value.to_owned(),
        }
    } else if is_permission(&e) {
        KsmError::PermissionDenied {
            path: path.to_path_buf(),
            source: e,
        }
    } else {
        KsmError::Rejected {
            knob,
            value: value.to_owned(),
            source: e,
        }
    }
}

/// The selected word of a sysfs choice file such as `[none] scan-time`.
pub(crate) fn selected_choice(content: &str) -> Option<&str> {
    let start = content.find('[')? + 1;
    let len = content[start..].find(']')?;
    Some(&content[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names_the_cause() {
        let p = Path::new("/sys/kernel/mm/ksm/max_page_sharing");
        let os = io::Error::from_raw_os_error;
        let e = write_error("max_page_sharing", "512", p, os(libc::EBUSY));
        assert!(
            matches!(
                e,
                KsmError::Busy {
                    knob: "max_page_sharing",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("no pages are merged"), "{e}");
        for errno in [libc::EACCES, libc::EPERM, libc::EROFS] {
            let e = write_error("run", "1", p, os(errno));
            assert!(matches!(e, KsmError::PermissionDenied { .. }), "{e}");
            assert!(e.to_string().contains("root"), "{e}");
            let e = open_error(Path::new("/"), "run", p, os(errno));
            assert!(matches!(e, KsmError::PermissionDenied { .. }), "{e}");
        }
        let e = write_error("pages_to_scan", "x", p, os(libc::EINVAL));
        assert!(
            matches!(
                e,
                KsmError::Rejected {
                    knob: "pages_to_scan",
                    ..
                }
            ),
            "{e}"
        );
        let e = open_error(Path::new("/nonexistent/ksm"), "run", p, os(libc::ENOENT));
        assert!(matches!(e, KsmError::NotBuiltIn { .. }), "{e}");
        let e = open_error(Path::new("/"), "smart_scan", p, os(libc::ENOENT));
        assert!(
            matches!(
                e,
                KsmError::KnobMissing {
                    knob: "smart_scan",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn choice_file() {
        assert_eq!(selected_choice("[none] scan-time"), Some("none"));
        assert_eq!(selected_choice("none [scan-time]"), Some("scan-time"));
        assert_eq!(selected_choice("none scan-time"), None);
        assert_eq!(selected_choice("[none"), None);
    }
}
