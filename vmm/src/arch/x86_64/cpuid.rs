//! CPUID: KVM's supported set, normalised per vCPU (APIC IDs, topology
//! leaves, the hypervisor bit) so every vCPU sees a consistent one-socket,
//! one-thread-per-core machine.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to hold `n` distinct IDs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology(entry: &mut kvm_cpuid_entry2, apic_id: u32, vcpus: u32) {
    // Level 0: SMT (one thread per core); level 1: cores in the package.
    match entry.index {
        0 => {
            entry.eax = 0;
            entry.ebx = 1;
            entry.ecx = LEVEL_TYPE_SMT << 8;
        }
        1 => {
            entry.eax = id_bits(vcpus);
            entry.ebx = vcpus;
            entry.ecx = (LEVEL_TYPE_CORE << 8) | 1;
        }
        n => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = n;
        }
    }
    entry.edx = apic_id;
}

/// Adjusts `cpuid` for vCPU `index` of `vcpus`.
pub fn normalize(cpuid: &mut CpuId, index: u32, vcpus: u32) {
    let apic_id = index;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (vcpus.min(255) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if vcpus > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package minus one, bits 31:26; threads sharing
                // this cache minus one, bits 25:14 (one thread per core).
                entry.eax &= 0x3fff;
                entry.eax |= ((vcpus - 1).min(63)) << 26;
            }
            // No virtual PMU: hide it rather than expose host counters.
            LEAF_PMU => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => topology(entry, apic_id, vcpus),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xaabb_ccdd,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu_index() {
        let mut cpuid = CpuId::from_entries(&[
            leaf(1, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(0xa, 0),
        ])
        .unwrap();
        normalize(&mut cpuid, 2, 3);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_eq!(e[0].ebx & 0xffff, 0xccdd);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].eax, e[1].ebx, e[1].edx), (0, 1, 2));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8), (2, 3, LEVEL_TYPE_CORE));
        assert_eq!((e[3].ebx, e[3].ecx), (0, 2));
        assert_eq!(e[4].ebx, 0);
    }

    #[test]
    fn id_bits_rounds_up_to_a_power_of_two() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
