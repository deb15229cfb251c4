//! A description of the machine a result was measured on.

use std::fs;

use serde::Serialize;

use crate::host::{MemInfo, MIB};

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub mem_total_mib: u64,
    /// Whether /proc/cpuinfo shows vmx or svm (hardware virtualisation);
    /// without it KVM here emulates guest kernel mode.
    pub hw_virt: bool,
}

impl Machine {
    pub fn describe() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let hw_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_ascii_whitespace().any(|f| f == "vmx" || f == "svm"));
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        Self {
            kernel,
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_total_mib: MemInfo::read().map_or(0, |m| m.total / MIB),
            hw_virt,
        }
    }

    pub fn one_line(&self) -> String {
        format!(
            "{} CPUs ({}), {} MiB RAM, Linux {}, {}",
            self.cpus,
            self.cpu_model,
            self.mem_total_mib,
            self.kernel,
            if self.hw_virt {
                "VT-x/AMD-V"
            } else {
                "no vmx/svm (nested KVM emulating CPL0)"
            }
        )
    }
}
