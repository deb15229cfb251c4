//! Giving guest pages back to the host.
//!
//! MADV_DONTNEED on the private anonymous mapping behind guest RAM frees
//! the host pages (and drops any KSM sharing); the guest reads zeros when it
//! touches them again. Only whole pages strictly inside guest RAM are ever
//! passed to madvise: the range is resolved through vm-memory, which refuses
//! anything outside the guest's regions.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::virtio::PAGE_SIZE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiscardError {
    #[error("range {gpa:#x}+{len:#x} is not entirely in guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
}

/// Discards the whole pages inside guest range `[gpa, gpa + len)`;
/// returns how many bytes that was. Nothing is discarded unless the whole
/// range is guest RAM.
pub fn discard(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<u64, DiscardError> {
    let outside = DiscardError::OutsideRam { gpa, len };
    let end = gpa.checked_add(len).ok_or(outside)?;
    if len == 0 {
        return Ok(0);
    }
    if !mem.check_range(
        GuestAddress(gpa),
        usize::try_from(len).map_err(|_| outside)?,
    ) {
        return Err(outside);
    }
    let start = gpa.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let end = end / PAGE_SIZE * PAGE_SIZE;
    if start >= end {
        return Ok(0);
    }
    // Resolve every piece before touching any, so that a range that is
    // only partly RAM is refused whole.
    let mut pieces = Vec::new();
    // end - start <= len, which fits a usize (checked above).
    let whole = usize::try_from(end - start).map_err(|_| outside)?;
    for slice in mem.get_slices(GuestAddress(start), whole) {
        let slice = slice.map_err(|_| outside)?;
        pieces.push((slice.ptr_guard_mut().as_ptr() as usize, slice.len()));
    }
    let mut done = 0u64;
    for (host, n) in pieces {
        if host as u64 % PAGE_SIZE != 0 {
            // Guest regions are page-aligned mappings; this cannot happen.
            warn_ratelimited!("virtio-balloon: unaligned host address {host:#x}; not discarding");
            continue;
        }
        // SAFETY: [host, host + n) lies inside a guest RAM mapping owned by
        // `mem` (vm-memory resolved it) and is page-aligned. Rust holds no
        // references into guest RAM (all access is volatile), and
        // MADV_DONTNEED on private anonymous memory only makes the pages
        // read as zero again.
        let ret = unsafe { libc::madvise(host as *mut libc::c_void, n, libc::MADV_DONTNEED) };
        if ret != 0 {
            warn_ratelimited!(
                "virtio-balloon: madvise(MADV_DONTNEED) failed: {}",
                std::io::Error::last_os_error()
            );
            continue;
        }
        done += n as u64;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        // Two regions with a hole between them, like RAM around the MMIO gap.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x20_0000), 0x10_0000),
        ])
        .unwrap()
    }

    #[test]
    fn discarded_pages_read_as_zero_and_neighbours_survive() {
        let m = mem();
        m.write_slice(&[0xaa; 0x4000], GuestAddress(0x1000))
            .unwrap();
        assert_eq!(discard(&m, 0x2000, 0x2000), Ok(0x2000));
        let mut b = [0u8; 0x4000];
        m.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert!(b[..0x1000].iter().all(|&x| x == 0xaa));
        assert!(b[0x1000..0x3000].iter().all(|&x| x == 0));
        assert!(b[0x3000..].iter().all(|&x| x == 0xaa));
    }

    #[test]
    fn partial_pages_at_the_edges_are_kept() {
        let m = mem();
        m.write_slice(&[0xbb; 0x3000], GuestAddress(0x5000))
            .unwrap();
        assert_eq!(discard(&m, 0x5800, 0x1000), Ok(0));
        assert_eq!(discard(&m, 0x5800, 0x2000), Ok(0x1000));
        let mut b = [0u8; 0x3000];
        m.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
        assert!(b[..0x1000].iter().all(|&x| x == 0xbb));
        assert!(b[0x1000..0x2000].iter().all(|&x| x == 0));
        assert!(b[0x2000..].iter().all(|&x| x == 0xbb));
    }

    #[test]
    fn ranges_not_wholly_in_ram_are_refused_untouched() {
        let m = mem();
        m.write_slice(&[0xcc; 0x1000], GuestAddress(0xf_f000))
            .unwrap();
        // Runs into the hole.
        assert!(discard(&m, 0xf_f000, 0x2000).is_err());
        let mut b = [0u8; 0x1000];
        m.read_slice(&mut b, GuestAddress(0xf_f000)).unwrap();
        assert!(b.iter().all(|&x| x == 0xcc), "nothing discarded");
        assert!(discard(&m, 0x18_0000, 0x1000).is_err());
        assert!(discard(&m, 0x30_0000, 0x1000).is_err());
        assert!(discard(&m, u64::MAX - 0xfff, 0x1000).is_err());
        assert!(discard(&m, u64::MAX, 2).is_err());
        assert_eq!(discard(&m, 0, 0), Ok(0));
    }
}
