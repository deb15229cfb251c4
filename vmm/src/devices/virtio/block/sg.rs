//! A request's data buffers as guest addresses (a scatter-gather list),
//! taken from its descriptor chain on the event loop and copied to or from
//! on the I/O thread.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest buffers in chain order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Buffers {
    list: Vec<(GuestAddress, u64)>,
    len: u64,
}

impl Buffers {
    /// The buffers of `descs` (a chain's readable or writable part).
    pub fn from_descriptors(
        descs: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    ) -> Self {
        let mut b = Buffers::default();
        for d in descs {
            b.push(d.addr(), u64::from(d.len()));
        }
        b
    }

    fn push(&mut self, addr: GuestAddress, len: u64) {
        if len > 0 {
            self.list.push((addr, len));
            // At most 65536 descriptors of 4 GiB: no overflow.
            self.len = self.len.saturating_add(len);
        }
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when every buffer lies in guest memory.
    pub fn in_memory(&self, mem: &GuestMemoryMmap) -> bool {
        self.list
            .iter()
            .all(|&(a, n)| usize::try_from(n).is_ok_and(|n| mem.check_range(a, n)))
    }

    /// Splits off the last byte (where a virtio-blk status goes).
    pub fn split_last_byte(mut self) -> Option<(Buffers, GuestAddress)> {
        let (addr, n) = self.list.pop()?;
        let last = addr.checked_add(n - 1)?;
        if n > 1 {
            self.list.push((addr, n - 1));
        }
        self.len -= 1;
        Some((self, last))
    }

    /// Reads `out.len()` bytes from the front and drops them from the list;
    /// false (and nothing dropped) if there are fewer or a read fails.
    pub fn read_front(&mut self, mem: &GuestMemoryMmap, out: &mut [u8]) -> bool {
        if (out.len() as u64) > self.len {
            return false;
        }
        if Cursor::new(self).read(mem, out).is_err() {
            return false;
        }
        self.drop_front(out.len() as u64);
        true
    }

    /// Writes as much of `data` as fits at the front; returns the count.
    pub fn write_front(&mut self, mem: &GuestMemoryMmap, data: &[u8]) -> u64 {
        let n = usize::try_from(self.len).map_or(data.len(), |l| l.min(data.len()));
        if Cursor::new(self).write(mem, &data[..n]).is_err() {
            return 0;
        }
        self.drop_front(n as u64);
        n as u64
    }

    fn drop_front(&mut self, mut n: u64) {
        self.len -= n;
        let mut first = 0;
        while n > 0 {
            let (a, l) = self.list[first];
            if l <= n {
                n -= l;
                first += 1;
            } else {
                self.list[first] = (GuestAddress(a.0 + n), l - n);
                n = 0;
            }
        }
        self.list.drain(..first);
    }

    /// A cursor at the first byte.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor::new(self)
    }
}

/// A position in a [`Buffers`] list, for copying it piece by piece.
#[derive(Debug)]
pub struct Cursor<'a> {
    list: &'a [(GuestAddress, u64)],
    index: usize,
    offset: u64,
}

/// A buffer was not in guest memory after all (the guest's memory map
/// does not change at run time, so this is a checked-for impossibility).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfGuestMemory;

impl<'a> Cursor<'a> {
    fn new(b: &'a Buffers) -> Self {
        Self {
            list: &b.list,
            index: 0,
            offset: 0,
        }
    }

    /// Calls `f(address, length)` for the next `n` bytes, piece by piece.
    fn advance(
        &mut self,
        mut n: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), OutOfGuestMemory>,
    ) -> Result<(), OutOfGuestMemory> {
        let mut done = 0;
        while n > 0 {
            let &(addr, len) = self.list.get(self.index).ok_or(OutOfGuestMemory)?;
            let left = len - self.offset;
            let take = usize::try_from(left).map_or(n, |l| l.min(n));
            f(GuestAddress(addr.0 + self.offset), done, take)?;
            done += take;
            n -= take;
            self.offset += take as u64;
            if self.offset == len {
                self.index += 1;
                self.offset = 0;
            }
        }
        Ok(())
    }

    /// Copies the next `out.len()` bytes of guest memory into `out`.
    pub fn read(&mut self, mem: &GuestMemoryMmap, out: &mut [u8]) -> Result<(), OutOfGuestMemory> {
        self.advance(out.len(), |a, at, n| {
            mem.read_slice(&mut out[at..at + n], a)
                .map_err(|_| OutOfGuestMemory)
        })
    }

    /// Copies `data` into the next `data.len()` bytes of guest memory.
    pub fn write(&mut self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<(), OutOfGuestMemory> {
        self.advance(data.len(), |a, at, n| {
            mem.write_slice(&data[at..at + n], a)
                .map_err(|_| OutOfGuestMemory)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::guest_mem;

    fn bufs(list: &[(u64, u64)]) -> Buffers {
        let mut b = Buffers::default();
        for &(a, n) in list {
            b.push(GuestAddress(a), n);
        }
        b
    }

    #[test]
    fn the_status_byte_is_the_last_byte_of_the_last_buffer() {
        let b = bufs(&[(0x1000, 512), (0x3000, 1)]);
        let (data, status) = b.split_last_byte().unwrap();
        assert_eq!(status, GuestAddress(0x3000));
        assert_eq!(data, bufs(&[(0x1000, 512)]));
        let (data, status) = bufs(&[(0x1000, 513)]).split_last_byte().unwrap();
        assert_eq!(status, GuestAddress(0x1200));
        assert_eq!(data.len(), 512);
        assert!(Buffers::default().split_last_byte().is_none());
    }

    #[test]
    fn reads_and_writes_cross_buffer_boundaries_and_consume_the_front() {
        let mem = guest_mem();
        mem.write_slice(b"abc", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"defgh", GuestAddress(0x2000)).unwrap();
        let mut b = bufs(&[(0x1000, 3), (0x2000, 5)]);
        let mut four = [0u8; 4];
        assert!(b.read_front(&mem, &mut four));
        assert_eq!(&four, b"abcd");
        assert_eq!(b, bufs(&[(0x2001, 4)]));
        let mut five = [0u8; 5];
        assert!(!b.read_front(&mem, &mut five), "only 4 bytes are left");
        assert_eq!(b.write_front(&mem, b"WXYZ12"), 4, "writes what fits");
        let mut got = [0u8; 5];
        mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got, b"dWXYZ");
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn aliasing_buffers_are_copied_once_per_mention() {
        let mem = guest_mem();
        let b = bufs(&[(0x1000, 2), (0x1000, 2), (0x1000, 2)]);
        assert_eq!(b.len(), 6);
        b.cursor().write(&mem, b"aabbcc").unwrap();
        let mut got = [0u8; 2];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(&got, b"cc", "the last mention wins");
    }

    #[test]
    fn buffers_outside_guest_memory_are_found() {
        let mem = guest_mem();
        assert!(bufs(&[(0x1000, 4096)]).in_memory(&mem));
        assert!(!bufs(&[(0x1000, 4096), (u64::MAX - 10, 4)]).in_memory(&mem));
        assert!(!bufs(&[(0x1000, 1 << 40)]).in_memory(&mem));
        let mut c = bufs(&[(0x1000, 4)]);
        let mut cur = c.cursor();
        assert_eq!(cur.write(&mem, &[0u8; 5]), Err(OutOfGuestMemory));
        assert_eq!(c.write_front(&mem, b"1234"), 4);
    }
}
