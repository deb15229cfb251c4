//! The host's limits that a configuration is checked against, probed once
//! per command: what KVM allows, and what the host can ever back
//! ([`HostCapacity`]). Validation takes them as values, so that its tests
//! need no real host.

use std::path::Path;

use crate::arch::x86_64::mptable::MAX_CPUS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// The most vCPUs one VM may have: KVM's limit and the MP table's.
    pub max_vcpus: u32,
    /// What one guest may ask for without `allow_overcommit`.
    pub capacity: HostCapacity,
}

/// What this host can ever give one guest. A guest asking for more cannot
/// be backed even when it runs alone: its memory ends in the OOM killer,
/// its vCPUs only time-share. `None`: unknown (not checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostCapacity {
    /// MemTotal + SwapTotal (/proc/meminfo), bytes.
    pub mem_bytes: Option<u64>,
    /// Online CPUs (/sys/devices/system/cpu/online).
    pub cpus: Option<u32>,
}

impl HostLimits {
    /// Asks this host's KVM; the MP table's limit when /dev/kvm cannot be
    /// opened (the build then fails with its own clear error).
    pub fn probe() -> Self {
        let max_vcpus = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => Self::kvm_max_vcpus(&kvm),
            Err(_) => MAX_CPUS,
        };
        Self {
            max_vcpus,
            capacity: HostCapacity::probe(),
        }
    }

    fn kvm_max_vcpus(kvm: &kvm_ioctls::Kvm) -> u32 {
        let kvm_max = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        kvm_max.min(MAX_CPUS)
    }
}

impl HostCapacity {
    /// Reads /proc/meminfo and the online CPU list; what cannot be read
    /// (a sandbox hiding /proc/meminfo) is left unchecked, with a warning.
    pub fn probe() -> Self {
        let read = |p: &str| std::fs::read_to_string(Path::new(p));
        let mem_bytes = read("/proc/meminfo").ok().and_then(|t| parse_meminfo(&t));
        if mem_bytes.is_none() {
            log::warn!("cannot read MemTotal from /proc/meminfo: guest memory is not checked against the host's");
        }
        // The online CPUs, not this process's affinity: a VMM pinned to
        // fewer CPUs by its unit is the hoster's choice, not the host's size.
        let cpus = read("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|t| parse_cpu_list(&t))
            .or_else(|| {
                std::thread::available_parallelism()
                    .ok()
                    .and_then(|n| u32::try_from(n.get()).ok())
            });
        if cpus.is_none() {
            log::warn!("cannot count the online CPUs: vCPUs are not checked against the host's");
        }
        Self { mem_bytes, cpus }
    }
}

/// MemTotal + SwapTotal of a /proc/meminfo text, in bytes; None without
/// MemTotal. A missing SwapTotal (no CONFIG_SWAP) counts as none.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let kib = |key: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    let total = kib("MemTotal")?;
    let swap = kib("SwapTotal").unwrap_or(0);
    total.checked_add(swap)?.checked_mul(1024)
}

/// The number of CPUs in a kernel CPU list (`0-3,6,8-9`); None when it is
/// malformed or empty.
pub fn parse_cpu_list(text: &str) -> Option<u32> {
    let mut n: u32 = 0;
    for part in text.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<u32>().ok()?, hi.parse::<u32>().ok()?),
            None => {
                let c = part.parse::<u32>().ok()?;
                (c, c)
            }
        };
        n = n.checked_add(hi.checked_sub(lo)?.checked_add(1)?)?;
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_adds_swap_to_ram() {
        let text = "MemTotal:       24683652 kB\nMemFree:  1 kB\nSwapCached: 0 kB\nSwapTotal:       2097148 kB\n";
        assert_eq!(parse_meminfo(text), Some((24_683_652 + 2_097_148) * 1024));
        // No swap line (CONFIG_SWAP=n) is no swap.
        assert_eq!(parse_meminfo("MemTotal: 1024 kB\n"), Some(1 << 20));
        assert_eq!(parse_meminfo("MemFree: 1024 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: lots\n"), None);
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,6,8-9\n"), Some(7));
        for bad in ["", "\n", "3-1", "a-b", "0,,1"] {
            assert_eq!(parse_cpu_list(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn this_host_is_probed() {
        // Every Linux test machine has /proc/meminfo and online CPUs.
        let c = HostCapacity::probe();
        assert!(c.mem_bytes.is_some_and(|b| b > 0), "{c:?}");
        assert!(c.cpus.is_some_and(|n| n > 0), "{c:?}");
    }
}
