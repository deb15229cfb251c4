//! Guest RAM: private anonymous mappings laid out around the 32-bit MMIO
//! gap, registered with KVM and marked MADV_MERGEABLE for KSM.

use kvm_bindings::kvm_userspace_memory_region;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::ram_ranges;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest memory: {source}")]
    Map {
        mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("madvise({advice}) on guest memory at {addr:#x}+{len:#x} failed: {source}")]
    Madvise {
        advice: &'static str,
        addr: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("cannot register guest memory slot {slot} with KVM: {source}")]
    Register {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// One guest RAM region as the host sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRegion {
    pub guest_addr: u64,
    pub host_addr: u64,
    pub len: u64,
}

/// Maps `mem_bytes` of guest RAM (not yet touched, so not yet resident).
///
/// Guest RAM is kept out of core dumps (MADV_DONTDUMP): a VMM crash must not
/// write a tenant's memory to the host's disk. The flag also keeps the
/// kernel from merging a guest RAM mapping with an adjacent anonymous
/// mapping, so each guest RAM region stays its own VMA(s) in smaps, which
/// the statistics rely on.
pub fn create(mem_bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_bytes)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), crate::usize_of(len)))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map {
        mib: mem_bytes >> 20,
        source,
    })?;
    madvise_all(&mem, libc::MADV_DONTDUMP, "MADV_DONTDUMP")?;
    Ok(mem)
}

/// The host mappings behind guest RAM, for madvise and for statistics.
pub fn host_regions(mem: &GuestMemoryMmap) -> Vec<HostRegion> {
    mem.iter()
        .map(|r| HostRegion {
            guest_addr: r.start_addr().raw_value(),
            host_addr: r.as_ptr() as u64,
            len: r.len(),
        })
        .collect()
}

fn madvise_all(
    mem: &GuestMemoryMmap,
    advice: libc::c_int,
    name: &'static str,
) -> Result<(), MemoryError> {
    for r in host_regions(mem) {
        // SAFETY: the range is exactly one of our own guest RAM mappings, which
        // stay mapped for the life of `mem`; MADV_(UN)MERGEABLE does not change
        // the contents the guest sees.
        let ret = unsafe {
            libc::madvise(
                r.host_addr as *mut libc::c_void,
                crate::usize_of(r.len),
                advice,
            )
        };
        if ret != 0 {
            return Err(MemoryError::Madvise {
                advice: name,
                addr: r.host_addr,
                len: r.len,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// Marks all guest RAM as a KSM merge candidate (or withdraws it, which
/// unmerges every merged page of this VM).
pub fn set_mergeable(mem: &GuestMemoryMmap, mergeable: bool) -> Result<(), MemoryError> {
    if mergeable {
        madvise_all(mem, libc::MADV_MERGEABLE, "MADV_MERGEABLE")
    } else {
        madvise_all(mem, libc::MADV_UNMERGEABLE, "MADV_UNMERGEABLE")
    }
}

/// Registers every region as a KVM memory slot.
pub fn register(vm: &kvm_ioctls::VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, r) in (0u32..).zip(host_regions(mem)) {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: r.guest_addr,
            memory_size: r.len,
            userspace_addr: r.host_addr,
            flags: 0,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the
        // VM keeps alive (and does not unmap) for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_match_layout_and_are_mergeable() {
        let mem = create(64 << 20).unwrap();
        let regions = host_regions(&mem);
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].len, 64 << 20);
        set_mergeable(&mem, true).unwrap();
        // The flag shows up as `mg` in VmFlags of exactly this mapping.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{:x}-", regions[0].host_addr);
        let block: String = smaps
            .split_inclusive('\n')
            .skip_while(|l| !l.starts_with(&header))
            .take(40)
            .collect();
        let flags = block.lines().find(|l| l.starts_with("VmFlags")).unwrap();
        assert!(flags.split_whitespace().any(|f| f == "mg"), "{flags}");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
        set_mergeable(&mem, false).unwrap();
    }
}
