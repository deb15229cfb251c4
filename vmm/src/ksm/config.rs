//! `ksmvm ksm apply FILE`: the tuning knobs from a TOML file.
//!
//! ```toml
//! pages_to_scan = 1000
//! sleep_millisecs = 20
//! advisor_mode = "none"          # or "scan-time"
//! advisor_target_scan_time = 200 # seconds
//! use_zero_pages = false
//! max_page_sharing = 256
//! merge_across_nodes = true
//! enabled = true                 # run=1 after the rest is set
//! ```

use std::fs;
use std::path::Path;

use super::tune::KsmTuning;
use super::KsmError;

/// Parses and validates a tuning file without touching the kernel.
pub fn load(path: &Path) -> Result<KsmTuning, KsmError> {
    let text = fs::read_to_string(path).map_err(|source| KsmError::ConfigRead {
        path: path.to_path_buf(),
        source,
    })?;
    let tuning = parse(&text).map_err(|source| KsmError::ConfigSyntax {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    tuning.validate().map_err(|e| match e {
        KsmError::InvalidValue { knob, problem } => KsmError::ConfigInvalid {
            path: path.to_path_buf(),
            key: knob,
            problem,
        },
        other => other,
    })?;
    Ok(tuning)
}

/// Parses tuning TOML; unknown keys are errors.
pub fn parse(text: &str) -> Result<KsmTuning, toml::de::Error> {
    toml::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ksm::AdvisorMode;

    #[test]
    fn parses_every_key() {
        let t = parse(
            r#"
            pages_to_scan = 1000
            sleep_millisecs = 20
            advisor_mode = "scan-time"
            advisor_target_scan_time = 200
            use_zero_pages = true
            max_page_sharing = 256
            merge_across_nodes = false
            enabled = true
            "#,
        )
        .unwrap();
        assert_eq!(t.pages_to_scan, Some(1000));
        assert_eq!(t.advisor_mode, Some(AdvisorMode::ScanTime));
        assert_eq!(t.use_zero_pages, Some(true));
        assert_eq!(t.merge_across_nodes, Some(false));
        assert_eq!(t.enabled, Some(true));
    }

    #[test]
    fn rejects_unknown_key_and_names_it() {
        let e = parse("pages_to_scan = 10\npages_to_scna = 3\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("pages_to_scna"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn rejects_bad_advisor_and_wrong_type() {
        assert!(parse("advisor_mode = \"fast\"").is_err());
        assert!(parse("use_zero_pages = \"on\"").is_err());
        assert!(parse("pages_to_scan = -1").is_err());
    }

    #[test]
    fn load_names_file_key_and_problem() {
        let dir = crate::ksm::test_util::TempDir::new("cfg");
        let path = dir.path().join("ksm.toml");
        fs::write(&path, "max_page_sharing = 1\n").unwrap();
        let msg = load(&path).unwrap_err().to_string();
        assert!(msg.contains("ksm.toml"), "{msg}");
        assert!(msg.contains("max_page_sharing"), "{msg}");
        assert!(msg.contains("out of range"), "{msg}");

        fs::write(&path, "bogus = 1\n").unwrap();
        let msg = load(&path).unwrap_err().to_string();
        assert!(msg.contains("ksm.toml") && msg.contains("bogus"), "{msg}");

        let msg = load(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("missing.toml"), "{msg}");
    }
}
