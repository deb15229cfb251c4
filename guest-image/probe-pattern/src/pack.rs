//! `KSMVMRAM` packs: the non-zero pages of a captured guest memory image,
//! written by `guest-image/memprofile --pack` and replayed by the probe guest
//! (`probe.image=initrd`, the pack loaded verbatim as the initrd). See
//! guest-image/mastodon/README.md for the format; all integers are
//! little-endian:
//!
//! ```text
//! header (one page): 0 magic "KSMVMRAM", 8 version u32 (1), 12 page size u32,
//!   16 source pages u64, 24 pages stored u64 (n), 32 shared u64 (s),
//!   40 zero pages in the source u64, then zeros up to the page's end
//! page table: n u64 entries (bits 0..=55 frame number in the source, bits
//!   56..=63 class), padded with zeros to whole pages
//! data: the n pages in table order, the s shared ones first
//! ```
//!
//! Here: the header's parser and validation (shared by the probe guest and
//! host tools), and [`SyntheticPack`], a pack with known content for tests.

use crate::{fill_page, Checksum, DOMAIN_IMAGE, PAGE_LEN, PAGE_SIZE, PAGE_SIZE_U32, PAGE_WORDS};

/// The first 8 bytes of every pack.
pub const MAGIC: [u8; 8] = *b"KSMVMRAM";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Bytes of the header that carry fields (the rest of its page is zero).
pub const HEADER_LEN: usize = 48;
/// Bits of a table entry that hold the source frame number.
pub const FRAME_MASK: u64 = (1 << 56) - 1;
/// Where a table entry's class starts.
pub const CLASS_SHIFT: u32 = 56;
/// Class: identical at the same address in every captured image.
pub const CLASS_SAME_OFFSET: u8 = 1;
/// Class: present (anywhere) in every other captured image.
pub const CLASS_SHARED_ALL: u8 = 2;
/// Class: present in some other captured images.
pub const CLASS_SHARED_SOME: u8 = 3;
/// Class: in no other image, but more than once in this one.
pub const CLASS_DUP_SELF: u8 = 4;
/// Class: in no other image, once.
pub const CLASS_UNIQUE: u8 = 5;

/// A validated pack header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackHeader {
    /// Pages of the captured image (its RAM size / page size).
    pub source_pages: u64,
    /// Pages stored in the pack (the source's non-zero pages).
    pub pages: u64,
    /// Of these, the shared ones (stored first).
    pub shared: u64,
    /// Zero pages in the source (not stored).
    pub zero_pages: u64,
}

/// Why a pack is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackError {
    /// Shorter than its header page.
    Short { len: u64 },
    /// Not a pack.
    Magic,
    /// Another format version.
    Version(u32),
    /// Another page size than [`PAGE_SIZE`].
    PageSize(u32),
    /// More shared pages than pages stored.
    SharedCount { shared: u64, pages: u64 },
    /// Stored + zero pages are not the source's pages.
    SourcePages { pages: u64, zero: u64, source: u64 },
    /// The file is shorter than its header says (`needed` is `None` if the
    /// size overflows).
    Truncated { needed: Option<u64>, len: u64 },
    /// A table entry whose class does not fit its position (shared classes
    /// 1..=3 come first, then 4..=5).
    Class { index: u64, class: u8 },
    /// A table entry whose frame lies outside the source.
    Frame { index: u64, frame: u64 },
}

impl core::fmt::Display for PackError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            PackError::Short { len } => write!(
                f,
                "{len} bytes is shorter than the {PAGE_SIZE}-byte KSMVMRAM header"
            ),
            PackError::Magic => write!(f, "bad magic (not a KSMVMRAM pack)"),
            PackError::Version(v) => write!(f, "unsupported version {v} (expected {VERSION})"),
            PackError::PageSize(s) => write!(f, "page size {s}, expected {PAGE_SIZE}"),
            PackError::SharedCount { shared, pages } => {
                write!(f, "{shared} shared pages but only {pages} stored")
            }
            PackError::SourcePages {
                pages,
                zero,
                source,
            } => write!(
                f,
                "{pages} stored + {zero} zero pages do not add up to {source} source pages"
            ),
            PackError::Truncated {
                needed: Some(n),
                len,
            } => write!(f, "size {len} bytes, the header needs {n}"),
            PackError::Truncated { needed: None, len } => {
                write!(f, "size {len} bytes, the header's counts overflow")
            }
            PackError::Class { index, class } => {
                write!(f, "page table entry {index} has class {class}")
            }
            PackError::Frame { index, frame } => write!(
                f,
                "page table entry {index} names frame {frame:#x} outside the source"
            ),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl PackHeader {
    /// Parses and validates the header of a pack of `len` bytes whose start
    /// is `bytes` (at least [`HEADER_LEN`] bytes if `len` allows).
    pub fn parse(bytes: &[u8], len: u64) -> Result<PackHeader, PackError> {
        if len < PAGE_SIZE || bytes.len() < HEADER_LEN {
            return Err(PackError::Short { len });
        }
        if bytes[..8] != MAGIC {
            return Err(PackError::Magic);
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(PackError::Version(version));
        }
        let page_size = u32_at(bytes, 12);
        if u64::from(page_size) != PAGE_SIZE {
            return Err(PackError::PageSize(page_size));
        }
        let h = PackHeader {
            source_pages: u64_at(bytes, 16),
            pages: u64_at(bytes, 24),
            shared: u64_at(bytes, 32),
            zero_pages: u64_at(bytes, 40),
        };
        if h.shared > h.pages {
            return Err(PackError::SharedCount {
                shared: h.shared,
                pages: h.pages,
            });
        }
        if h.pages.checked_add(h.zero_pages) != Some(h.source_pages) {
            return Err(PackError::SourcePages {
                pages: h.pages,
                zero: h.zero_pages,
                source: h.source_pages,
            });
        }
        match h.file_len() {
            Some(n) if n <= len => Ok(h),
            needed => Err(PackError::Truncated { needed, len }),
        }
    }

    /// The header's first [`HEADER_LEN`] bytes (the rest of its page is zero).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&PAGE_SIZE_U32.to_le_bytes());
        b[16..24].copy_from_slice(&self.source_pages.to_le_bytes());
        b[24..32].copy_from_slice(&self.pages.to_le_bytes());
        b[32..40].copy_from_slice(&self.shared.to_le_bytes());
        b[40..48].copy_from_slice(&self.zero_pages.to_le_bytes());
        b
    }

    /// Stored pages that are not shared (dup_self and unique).
    pub fn unique(&self) -> u64 {
        self.pages - self.shared
    }

    /// Pages of the page table (None on overflow).
    pub fn table_pages(&self) -> Option<u64> {
        Some(self.pages.checked_mul(8)?.div_ceil(PAGE_SIZE))
    }

    /// Byte offset of the first stored page (None on overflow).
    pub fn data_offset(&self) -> Option<u64> {
        self.table_pages()?.checked_add(1)?.checked_mul(PAGE_SIZE)
    }

    /// Bytes of the whole pack: header, table and pages (None on overflow).
    pub fn file_len(&self) -> Option<u64> {
        self.data_offset()?
            .checked_add(self.pages.checked_mul(PAGE_SIZE)?)
    }

    /// Checks table entry `index`: its class must fit its position and its
    /// frame must lie in the source.
    pub fn check_entry(&self, index: u64, entry: u64) -> Result<(), PackError> {
        let class = (entry >> CLASS_SHIFT) as u8;
        let expected = if index < self.shared {
            CLASS_SAME_OFFSET..=CLASS_SHARED_SOME
        } else {
            CLASS_DUP_SELF..=CLASS_UNIQUE
        };
        if !expected.contains(&class) {
            return Err(PackError::Class { index, class });
        }
        let frame = entry & FRAME_MASK;
        if frame >= self.source_pages {
            return Err(PackError::Frame { index, frame });
        }
        Ok(())
    }
}

/// Writes `seed` into the first word of an own (not shared) image page, as
/// the probe guest does when it loads a pack.
pub fn seed_page(page: &mut [u64; PAGE_WORDS], seed: u64) {
    page[0] = seed;
}

/// A pack with known content, for tests: `shared` pages that depend only on
/// `key` (class shared_all), then `unique` pages (class unique), from a
/// source of `shared + unique + zero` pages laid out in that order.
/// Stored page `i` is `fill_page(DOMAIN_IMAGE, key, i)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticPack {
    pub shared: u64,
    pub unique: u64,
    pub zero: u64,
    pub key: u64,
}

impl SyntheticPack {
    pub fn header(&self) -> PackHeader {
        PackHeader {
            source_pages: self.shared + self.unique + self.zero,
            pages: self.shared + self.unique,
            shared: self.shared,
            zero_pages: self.zero,
        }
    }

    /// Table entry `index`.
    pub fn entry(&self, index: u64) -> u64 {
        let class = if index < self.shared {
            CLASS_SHARED_ALL
        } else {
            CLASS_UNIQUE
        };
        index | (u64::from(class) << CLASS_SHIFT)
    }

    /// Stored page `index` as it is in the file.
    pub fn page(&self, index: u64, out: &mut [u64; PAGE_WORDS]) {
        fill_page(DOMAIN_IMAGE, self.key, index, out);
    }

    /// Calls `out` with consecutive pieces of the whole pack (whole pages).
    pub fn write(&self, mut out: impl FnMut(&[u8])) {
        let h = self.header();
        let mut bytes = [0u8; PAGE_LEN];
        bytes[..HEADER_LEN].copy_from_slice(&h.encode());
        out(&bytes);
        let entries_per_page = PAGE_SIZE / 8;
        let table_pages = h.table_pages().expect("synthetic pack too large");
        for t in 0..table_pages {
            bytes.fill(0);
            for (k, slot) in bytes.chunks_exact_mut(8).enumerate() {
                let index = t * entries_per_page + k as u64;
                if index < h.pages {
                    slot.copy_from_slice(&self.entry(index).to_le_bytes());
                }
            }
            out(&bytes);
        }
        let mut page = [0u64; PAGE_WORDS];
        for i in 0..h.pages {
            self.page(i, &mut page);
            for (slot, w) in bytes.chunks_exact_mut(8).zip(page) {
                slot.copy_from_slice(&w.to_le_bytes());
            }
            out(&bytes);
        }
    }

    /// The checksum the probe reports (`PROBE IMAGE checksum=`) for this pack
    /// loaded with `probe.seed=seed`: [`Checksum`] over the stored pages in
    /// order, the own ones with `seed` in their first word.
    pub fn expected_checksum(&self, seed: u64) -> u64 {
        let mut sum = Checksum::new();
        let mut page = [0u64; PAGE_WORDS];
        for i in 0..self.shared + self.unique {
            self.page(i, &mut page);
            if i >= self.shared {
                seed_page(&mut page, seed);
            }
            sum.update_page(&page);
        }
        sum.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern crate std;
    use std::vec::Vec;

    fn bytes(p: &SyntheticPack) -> Vec<u8> {
        let mut v = Vec::new();
        p.write(|b| v.extend_from_slice(b));
        v
    }

    #[test]
    fn synthetic_layout_parses() {
        let p = SyntheticPack {
            shared: 3,
            unique: 600,
            zero: 7,
            key: 9,
        };
        let b = bytes(&p);
        let h = PackHeader::parse(&b, b.len() as u64).unwrap();
        assert_eq!(h, p.header());
        assert_eq!(h.table_pages(), Some(2));
        assert_eq!(b.len() as u64, (1 + 2 + 603) * PAGE_SIZE);
        assert_eq!(h.file_len(), Some(b.len() as u64));
        for i in 0..h.pages {
            let at = PAGE_LEN + usize::try_from(i).unwrap() * 8;
            let e = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
            assert_eq!(e, p.entry(i));
            h.check_entry(i, e).unwrap();
        }
        // Padding of the table is zero.
        assert!(b[PAGE_LEN + 603 * 8..3 * PAGE_LEN].iter().all(|&x| x == 0));
        let mut page = [0u64; PAGE_WORDS];
        p.page(5, &mut page);
        let at = (3 + 5) * PAGE_LEN;
        assert_eq!(b[at..at + 8], page[0].to_le_bytes());
        assert_ne!(p.expected_checksum(1), p.expected_checksum(2));
    }

    #[test]
    fn bad_headers_are_refused() {
        let p = SyntheticPack {
            shared: 1,
            unique: 1,
            zero: 0,
            key: 0,
        };
        let good = bytes(&p);
        let len = good.len() as u64;
        assert_eq!(
            PackHeader::parse(&good[..100], 100),
            Err(PackError::Short { len: 100 })
        );
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(PackHeader::parse(&b, len), Err(PackError::Magic));
        let mut b = good.clone();
        b[8] = 2;
        assert_eq!(PackHeader::parse(&b, len), Err(PackError::Version(2)));
        let mut b = good.clone();
        b[12..16].copy_from_slice(&64u32.to_le_bytes());
        assert_eq!(PackHeader::parse(&b, len), Err(PackError::PageSize(64)));
        let mut b = good.clone();
        b[32] = 3;
        assert!(matches!(
            PackHeader::parse(&b, len),
            Err(PackError::SharedCount { .. })
        ));
        let mut b = good.clone();
        b[40] = 1;
        assert!(matches!(
            PackHeader::parse(&b, len),
            Err(PackError::SourcePages { .. })
        ));
        assert_eq!(
            PackHeader::parse(&good, len - 1),
            Err(PackError::Truncated {
                needed: Some(len),
                len: len - 1
            })
        );
        let mut b = good.clone();
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        b[40..48].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(
            PackHeader::parse(&b, len),
            Err(PackError::Truncated { needed: None, len })
        );
        let h = p.header();
        assert_eq!(
            h.check_entry(0, 5 << CLASS_SHIFT),
            Err(PackError::Class { index: 0, class: 5 })
        );
        assert_eq!(
            h.check_entry(1, 2 << CLASS_SHIFT),
            Err(PackError::Class { index: 1, class: 2 })
        );
        assert_eq!(
            h.check_entry(1, 7 | (5 << CLASS_SHIFT)),
            Err(PackError::Frame { index: 1, frame: 7 })
        );
    }
}
