//! CPU time of the ksmd kernel thread, measured over a sampling window.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::KsmError;
use crate::stats::ApproxF64;

/// ksmd's CPU use over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KsmdCpu {
    pub pid: u32,
    /// Percent of one CPU (100 = one core busy all the window).
    pub percent: f64,
    /// The window actually measured, milliseconds.
    pub window_ms: u64,
}

/// Finds the ksmd thread (comm == "ksmd"); `None` when it does not exist,
/// e.g. no CONFIG_KSM or a PID namespace that hides kernel threads.
pub fn find_ksmd(proc_root: &Path) -> Result<Option<u32>, KsmError> {
    let entries = fs::read_dir(proc_root).map_err(|source| KsmError::Io {
        path: proc_root.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes vanish while we scan; an unreadable comm is not ksmd.
        if let Ok(comm) = fs::read(entry.path().join("comm")) {
            if comm.strip_suffix(b"\n").unwrap_or(&comm) == b"ksmd" {
                return Ok(Some(pid));
            }
        }
    }
    Ok(None)
}

/// utime + stime (clock ticks) from the text of /proc/PID/stat.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // comm may contain spaces and ')'; the fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn stat_path(proc_root: &Path, pid: u32) -> PathBuf {
    proc_root.join(pid.to_string()).join("stat")
}

fn read_ticks(proc_root: &Path, pid: u32) -> Result<u64, KsmError> {
    let path = stat_path(proc_root, pid);
    let text = fs::read_to_string(&path).map_err(|source| KsmError::Io {
        path: path.clone(),
        source,
    })?;
    parse_stat_ticks(&text).ok_or(KsmError::Parse {
        path,
        content: text,
    })
}

fn clock_ticks_per_second() -> Result<u64, KsmError> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => Ok(t.unsigned_abs()),
        _ => Err(KsmError::Io {
            path: PathBuf::from("sysconf(_SC_CLK_TCK)"),
            source: io::Error::last_os_error(),
        }),
    }
}

/// Samples ksmd's CPU use over `window` (blocks for that long).
pub fn sample_cpu(proc_root: &Path, window: Duration) -> Result<Option<KsmdCpu>, KsmError> {
    let Some(pid) = find_ksmd(proc_root)? else {
        return Ok(None);
    };
    let hz = clock_ticks_per_second()?;
    let t0 = Instant::now();
    let before = read_ticks(proc_root, pid)?;
    thread::sleep(window);
    let after = read_ticks(proc_root, pid)?;
    let elapsed = t0.elapsed();
    let busy_s = after.saturating_sub(before).approx_f64() / hz.approx_f64();
    let percent = if elapsed.is_zero() {
        0.0
    } else {
        100.0 * busy_s / elapsed.as_secs_f64()
    };
    Ok(Some(KsmdCpu {
        pid,
        percent,
        window_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ksm::test_util::TempDir;

    // This machine's ksmd line, with utime/stime set to 17 and 42.
    const KSMD_STAT: &str = "37 (ksmd) S 2 0 0 0 -1 2097216 0 0 0 0 17 42 0 0 25 5 1 0 26 0 0 \
        18446744073709551615 0 0 0 0 0 0 0 2147483647 0 1 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn parses_utime_stime() {
        assert_eq!(parse_stat_ticks(KSMD_STAT), Some(59));
        // comm with spaces and parentheses.
        let odd = "7 (a) b) c) S 2 0 0 0 -1 0 0 0 0 0 3 4 0 0";
        assert_eq!(parse_stat_ticks(odd), Some(7));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(parse_stat_ticks("1 (x) S 2"), None);
    }

    #[test]
    fn finds_ksmd_in_fake_proc() {
        let dir = TempDir::new("proc");
        for (pid, comm) in [("1", "init\n"), ("37", "ksmd\n"), ("self", "x\n")] {
            fs::create_dir(dir.path().join(pid)).unwrap();
            fs::write(dir.path().join(pid).join("comm"), comm).unwrap();
        }
        fs::write(dir.path().join("37").join("stat"), KSMD_STAT).unwrap();
        assert_eq!(find_ksmd(dir.path()).unwrap(), Some(37));
        let cpu = sample_cpu(dir.path(), Duration::from_millis(5))
            .unwrap()
            .unwrap();
        assert_eq!(cpu.pid, 37);
        assert_eq!(cpu.percent, 0.0);
    }

    #[test]
    fn no_ksmd_is_none() {
        let dir = TempDir::new("proc-empty");
        assert_eq!(sample_cpu(dir.path(), Duration::ZERO).unwrap(), None);
    }

    #[test]
    fn real_proc_has_ksmd_when_ksm_is_built_in() {
        if !Path::new("/sys/kernel/mm/ksm").exists() {
            return;
        }
        let cpu = sample_cpu(Path::new("/proc"), Duration::from_millis(20)).unwrap();
        // Inside a PID namespace kernel threads are hidden; only check sanity.
        if let Some(cpu) = cpu {
            assert!(cpu.percent >= 0.0 && cpu.percent <= 200.0, "{cpu:?}");
        }
    }
}
