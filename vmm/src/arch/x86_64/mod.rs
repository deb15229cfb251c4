//! x86-64 boot setup: memory layout, zero page and e820 map, page tables and
//! GDT, registers, CPUID, MSRs, LAPIC, the MP table and the ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

/// One entry of the e820 memory map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub const E820_RAM: u32 = 1;

/// The guest-physical RAM ranges for `mem_bytes` of RAM: below the 32-bit
/// MMIO gap first, the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(layout::MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if mem_bytes > low {
        ranges.push((layout::FIRST_ADDR_PAST_32BITS, mem_bytes - low));
    }
    ranges
}

/// The e820 map matching `ram_ranges` exactly: the real-mode area below the
/// EBDA, RAM from 1 MiB to the end of low memory, and RAM above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let ram = |addr, size| E820Entry {
        addr,
        size,
        kind: E820_RAM,
    };
    let mut map = Vec::with_capacity(3);
    for (start, len) in ram_ranges(mem_bytes) {
        if start == 0 {
            map.push(ram(0, layout::EBDA_START));
            map.push(ram(layout::HIMEM_START, len - layout::HIMEM_START));
        } else {
            map.push(ram(start, len));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_has_one_low_range() {
        assert_eq!(ram_ranges(128 * MIB), vec![(0, 128 * MIB)]);
        let map = e820_map(128 * MIB);
        assert_eq!(map.len(), 2);
        assert_eq!(map[0].size, layout::EBDA_START);
        assert_eq!(map[1].addr + map[1].size, 128 * MIB);
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_gap() {
        let mem = 4096 * MIB;
        let ranges = ram_ranges(mem);
        assert_eq!(ranges, vec![(0, 3072 * MIB), (1 << 32, 1024 * MIB)]);
        let map = e820_map(mem);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 1 << 32,
                size: 1024 * MIB,
                kind: E820_RAM
            }
        );
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, mem);
    }
}
