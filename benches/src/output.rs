//! A results folder per run: CSV tables, a JSON summary and plots.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Debug)]
pub struct ResultsDir {
    path: PathBuf,
}

impl ResultsDir {
    /// Creates `base/<kind>-<UTC timestamp>`.
    pub fn create(base: &Path, kind: &str) -> Result<Self> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = base.join(format!("{kind}-{}", utc_stamp(secs)));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&mut self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn csv<T: Serialize>(&mut self, name: &str, rows: &[T]) -> Result<()> {
        let path = self.file(name);
        let mut w = csv::Writer::from_path(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        for r in rows {
            w.serialize(r)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        w.flush()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn json<T: Serialize>(&mut self, name: &str, value: &T) -> Result<()> {
        let path = self.file(name);
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer_pretty(f, value)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// `YYYYmmdd-HHMMSS` (UTC) of a Unix time.
pub fn utc_stamp(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // u64::MAX / 86_400 < i64::MAX: always fits.
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX));
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a day of the month, 1..=31, by construction"
    )]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a month, 1..=12, by construction"
    )]
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
        assert_eq!(utc_stamp(1_764_143_999), "20251126-075959");
    }

    #[test]
    fn writes_csv_and_json() {
        #[derive(Serialize)]
        struct Row {
            a: u32,
            b: Option<f64>,
        }
        let base = std::env::temp_dir().join(format!("ksmvm-bench-out-{}", std::process::id()));
        let mut d = ResultsDir::create(&base, "t").unwrap();
        d.csv(
            "r.csv",
            &[Row { a: 1, b: None }, Row { a: 2, b: Some(0.5) }],
        )
        .unwrap();
        d.json("r.json", &vec![1, 2]).unwrap();
        let csv = fs::read_to_string(d.path().join("r.csv")).unwrap();
        assert_eq!(csv, "a,b\n1,\n2,0.5\n");
        fs::remove_dir_all(base).unwrap();
    }
}
