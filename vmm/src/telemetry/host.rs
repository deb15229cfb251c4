//! One reading of the host's KSM state for the host-wide views (`top`, the
//! exporter): counters, ksmd's cumulative CPU time, the page size.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ksm::{find_ksmd, parse_stat_ticks, Ksm, KsmCounters, RunMode};
use crate::stats::{page_size, ApproxF64};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostSample {
    /// None when the kernel has no KSM (or sysfs could not be read).
    pub counters: Option<KsmCounters>,
    pub run: Option<RunMode>,
    pub page_size: u64,
    /// ksmd's user + system time since boot; None when ksmd is not visible.
    pub ksmd_cpu_seconds: Option<f64>,
}

impl HostSample {
    pub fn read(ksm: &Ksm, proc_root: &Path) -> Self {
        let counters = ksm.counters().ok();
        let run = ksm.settings().ok().and_then(|s| s.run);
        Self {
            counters,
            run,
            page_size: page_size(),
            ksmd_cpu_seconds: ksmd_cpu_seconds(proc_root),
        }
    }

    /// Bytes KSM saves host-wide: every sharing mapping is a page not stored.
    pub fn saved_bytes(&self) -> Option<u64> {
        self.counters
            .as_ref()?
            .pages_sharing
            .map(|p| p * self.page_size)
    }

    /// ksmd's CPU use between two samples, in percent of one CPU.
    pub fn ksmd_percent_since(&self, earlier: &HostSample, secs: f64) -> Option<f64> {
        let busy = self.ksmd_cpu_seconds? - earlier.ksmd_cpu_seconds?;
        (secs > 0.0).then(|| (100.0 * busy / secs).max(0.0))
    }
}

fn ksmd_cpu_seconds(proc_root: &Path) -> Option<f64> {
    let pid = find_ksmd(proc_root).ok()??;
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    let hz = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t.approx_f64(),
        _ => return None,
    };
    Some(ticks.approx_f64() / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_values() {
        let a = HostSample {
            counters: Some(KsmCounters {
                pages_sharing: Some(10),
                ..Default::default()
            }),
            page_size: 4096,
            ksmd_cpu_seconds: Some(1.0),
            ..Default::default()
        };
        assert_eq!(a.saved_bytes(), Some(40960));
        let b = HostSample {
            ksmd_cpu_seconds: Some(1.5),
            ..a.clone()
        };
        assert_eq!(b.ksmd_percent_since(&a, 1.0), Some(50.0));
        assert_eq!(HostSample::default().saved_bytes(), None);
        assert_eq!(HostSample::default().ksmd_percent_since(&a, 1.0), None);
    }

    #[test]
    fn reads_this_host() {
        let s = HostSample::read(&Ksm::new(), Path::new("/proc"));
        assert!(s.page_size >= 4096);
    }
}
