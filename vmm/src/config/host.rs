//! The host's limits that a configuration is checked against, probed once
//! per command.

use crate::arch::x86_64::mptable::MAX_CPUS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// The most vCPUs one VM may have: KVM's limit and the MP table's.
    pub max_vcpus: u32,
}

impl HostLimits {
    /// Asks this host's KVM; the MP table's limit when /dev/kvm cannot be
    /// opened (the build then fails with its own clear error).
    pub fn probe() -> Self {
        match kvm_ioctls::Kvm::new() {
            Ok(kvm) => Self::of(&kvm),
            Err(_) => Self {
                max_vcpus: MAX_CPUS,
            },
        }
    }

    pub fn of(kvm: &kvm_ioctls::Kvm) -> Self {
        let kvm_max = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        Self {
            max_vcpus: kvm_max.min(MAX_CPUS),
        }
    }
}
