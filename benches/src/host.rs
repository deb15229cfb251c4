//! Host facts the harness needs: memory (/proc/meminfo) and the
//! preconditions of a run (root, /dev/kvm, KSM), with errors that say what
//! is missing.

use std::fs::{self, OpenOptions};
use std::path::Path;

use anyhow::{bail, Context, Result};

use ksmvm::ksm::Ksm;
use ksmvm::stats::ApproxF64;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const PAGE_SIZE: u64 = 4096;
/// [`PAGE_SIZE`] for arithmetic on page-count differences.
pub const PAGE_SIZE_I64: i64 = 4096;
const _: () = assert!(PAGE_SIZE_I64.unsigned_abs() == PAGE_SIZE);

/// The /proc/meminfo figures the harness uses, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total: u64,
    pub available: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

impl MemInfo {
    pub fn read() -> Result<Self> {
        let text = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        parse_meminfo(&text).context("parsing /proc/meminfo")
    }

    /// Memory in use by everything: MemTotal - MemAvailable.
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }

    pub fn swap_used(&self) -> u64 {
        self.swap_total.saturating_sub(self.swap_free)
    }
}

/// Parses the `Key:   N kB` lines of /proc/meminfo.
pub fn parse_meminfo(text: &str) -> Result<MemInfo> {
    let mut m = MemInfo::default();
    let (mut total, mut avail) = (false, false);
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let field = match key {
            "MemTotal" => &mut m.total,
            "MemAvailable" => &mut m.available,
            "SwapTotal" => &mut m.swap_total,
            "SwapFree" => &mut m.swap_free,
            _ => continue,
        };
        let kb: u64 = rest
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad meminfo line {line:?}"))?;
        *field = kb * 1024;
        total |= key == "MemTotal";
        avail |= key == "MemAvailable";
    }
    if !total || !avail {
        bail!("MemTotal or MemAvailable missing");
    }
    Ok(m)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// What a run needs; checked up front so that a missing one is one clear line.
#[derive(Debug)]
pub struct Needs {
    pub kvm: bool,
    pub ksm_control: bool,
}

pub fn preflight(needs: Needs, ksmvm: &Path, probe: &Path) -> Result<()> {
    for (what, path, hint) in [
        (
            "ksmvm binary",
            ksmvm,
            "build it with `cargo build --release` (or `make build`)",
        ),
        ("probe guest", probe, "build it with `make probe`"),
    ] {
        if !path.is_file() {
            bail!("{what} not found at {} — {hint}", path.display());
        }
    }
    if needs.kvm {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .context(
                "cannot open /dev/kvm read-write (KVM missing, or not root / not in the kvm group)",
            )?;
    }
    if needs.ksm_control {
        if !Ksm::new().is_available() {
            bail!(
                "KSM is not available: {} does not exist (kernel without CONFIG_KSM)",
                Ksm::SYSFS_ROOT
            );
        }
        if !is_root() {
            bail!("this command changes host KSM settings and reads other processes' memory maps: run it as root");
        }
    }
    Ok(())
}

pub fn mib(bytes: u64) -> f64 {
    bytes.approx_f64() / MIB.approx_f64()
}

pub fn mib_i(bytes: i64) -> f64 {
    bytes.approx_f64() / MIB.approx_f64()
}

pub fn gib(bytes: u64) -> f64 {
    bytes.approx_f64() / GIB.approx_f64()
}

/// `a - b` of two counters, saturating at the ends of an i64.
pub fn diff_i64(a: u64, b: u64) -> i64 {
    let d = i128::from(a) - i128::from(b);
    i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24684000 kB\nMemFree:        22041516 kB\n\
        MemAvailable:   24202592 kB\nBuffers:           1234 kB\nSwapTotal:             0 kB\n\
        SwapFree:              0 kB\nHugePages_Total:       0\n";

    #[test]
    fn parses_meminfo() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.total, 24684000 * 1024);
        assert_eq!(m.available, 24202592 * 1024);
        assert_eq!(m.used(), (24684000 - 24202592) * 1024);
        assert_eq!(m.swap_used(), 0);
    }

    #[test]
    fn rejects_incomplete_meminfo() {
        assert!(parse_meminfo("MemFree: 3 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n").is_err());
    }

    #[test]
    fn real_meminfo_is_sane() {
        let m = MemInfo::read().unwrap();
        assert!(m.total > 0 && m.available <= m.total);
    }
}
