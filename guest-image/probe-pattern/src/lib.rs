//! Memory content generator and checksum shared by the probe guest and the
//! host tests.
//!
//! The probe guest fills a *shared* region (content depends only on the
//! profile seed, so identical across VMs with the same profile: KSM merges
//! it) and a *unique* region (content depends on a per-VM seed: KSM cannot
//! merge it). Both are produced by [`fill_page`], a splitmix64 stream keyed by
//! `(domain, seed, page)`. The guest reports [`Checksum`]s of both regions,
//! which the host recomputes with [`expected_checksum`].
//!
//! Everything here is `no_std`, allocation-free and float-free: it runs at
//! CPL3 inside the probe guest as well as in host tests.

#![no_std]

pub mod pack;

/// Domain of the shared region (content keyed by `probe.profile`).
pub const DOMAIN_SHARED: u64 = 1;
/// Domain of the unique region (content keyed by `probe.seed`).
pub const DOMAIN_UNIQUE: u64 = 2;
/// Domain of virtio-blk content (`fill_sector`): the probe's `blk-write` and
/// `blk-read` commands.
pub const DOMAIN_BLOCK: u64 = 3;
/// Domain of virtio-net payloads (the probe's `net-send`).
pub const DOMAIN_NET: u64 = 4;
/// Domain of the pages of [`pack::SyntheticPack`] (test memory images).
pub const DOMAIN_IMAGE: u64 = 5;
/// Bytes in a disk sector.
pub const SECTOR_SIZE: usize = 512;
/// 64-bit words in a sector.
pub const SECTOR_WORDS: usize = SECTOR_SIZE / 8;
/// 64-bit words in a 4 KiB page.
pub const PAGE_WORDS: usize = 512;
/// Bytes in a page.
pub const PAGE_SIZE: u64 = 4096;
/// [`PAGE_SIZE`] as a length.
pub(crate) const PAGE_LEN: usize = PAGE_WORDS * 8;
/// [`PAGE_SIZE`] as a 32-bit field.
pub(crate) const PAGE_SIZE_U32: u32 = 4096;
const _: () = assert!(PAGE_LEN as u64 == PAGE_SIZE && PAGE_SIZE_U32 as u64 == PAGE_SIZE);

/// splitmix64's increment (2^64 / golden ratio, odd).
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's output function: a bijection on `u64`.
#[inline(always)]
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stream key of one page. For a fixed `(domain, seed)` it is a bijection
/// of `page`, so two pages of one region never share a key.
#[inline]
const fn page_key(domain: u64, seed: u64, page: u64) -> u64 {
    let d = mix64(domain.wrapping_mul(GOLDEN) ^ 0x6b73_6d76_6d5f_7062); // "ksmvm_pb"
    mix64(mix64(d ^ seed) ^ page)
}

/// Fills `out` with page number `page` (0-based within its region) of the
/// region of `domain` keyed by `seed`.
///
/// Word `i` is splitmix64 output number `i + 1` of the stream started at the
/// page's key; since that output function is a bijection, the first words of
/// two pages with different keys differ, so every page of a region is
/// distinct. The last word has its low bit forced on, so no page is all-zero
/// (KSM's zero-page handling must never apply to these pages).
#[inline]
pub fn fill_page(domain: u64, seed: u64, page: u64, out: &mut [u64; PAGE_WORDS]) {
    let key = page_key(domain, seed, page);
    let mut state = key;
    for w in out.iter_mut() {
        state = state.wrapping_add(GOLDEN);
        *w = mix64(state);
    }
    out[PAGE_WORDS - 1] |= 1;
}

/// Fills `out` with words `first..first + out.len()` of page `page` of the
/// region of `domain` keyed by `seed`: exactly the same words as
/// [`fill_page`] produces there (splitmix64 is random-access), without
/// generating the rest of the page. Words past the page's end are not
/// defined: `first + out.len()` must not exceed [`PAGE_WORDS`].
#[inline]
pub fn fill_words(domain: u64, seed: u64, page: u64, first: usize, out: &mut [u64]) {
    debug_assert!(first + out.len() <= PAGE_WORDS);
    let key = page_key(domain, seed, page);
    let mut state = key.wrapping_add(GOLDEN.wrapping_mul(first as u64));
    for w in out.iter_mut() {
        state = state.wrapping_add(GOLDEN);
        *w = mix64(state);
    }
    if first + out.len() == PAGE_WORDS {
        out[out.len() - 1] |= 1;
    }
}

/// Fills `out` with disk sector `sector` of the virtio-blk content keyed by
/// `seed`: sector `s` is the 512-byte slice `(s % 8) * 512..` of page
/// `s / 8` of [`DOMAIN_BLOCK`] (little-endian words). The content of a
/// sector depends only on its absolute number and the seed, so a host test
/// can write or check any range of an image file.
#[inline]
pub fn fill_sector(seed: u64, sector: u64, out: &mut [u64; SECTOR_WORDS]) {
    let first = (sector % 8) as usize * SECTOR_WORDS;
    fill_words(DOMAIN_BLOCK, seed, sector / 8, first, out);
}

/// Word 0 of every block the probe's `blk-seq` writes: `KSMVMSEQ`.
pub const SEQ_MARKER: u64 = u64::from_le_bytes(*b"KSMVMSEQ");

/// Fills `out` with block `seq` of the probe's `blk-seq` writer (block
/// `seq` is sector `seq`): [`fill_sector`]`(seed, seq)` with word 0
/// [`SEQ_MARKER`], word 1 `seq` and word 2 `seed`, so that a host test can
/// tell a block that was written from one that was not (or is stale, or
/// torn) by comparing the whole sector.
#[inline]
pub fn seq_sector(seed: u64, seq: u64, out: &mut [u64; SECTOR_WORDS]) {
    fill_sector(seed, seq, out);
    out[0] = SEQ_MARKER;
    out[1] = seq;
    out[2] = seed;
}

/// FNV-1a's 64-bit prime: odd, so `x -> x * P` is a bijection.
const LANE_PRIME: u64 = 0x0000_0100_0000_01b3;
/// FNV-1a's 64-bit offset basis.
const CHECKSUM_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// An order-dependent 64-bit hash of a sequence of pages.
///
/// Each page is hashed by four interleaved FNV-1a-style lanes (word `i` goes to
/// lane `i % 4`), which are then folded into the running state with the
/// splitmix64 bijection. Every step is a bijection of the state for a fixed
/// input word, so changing any single word of any page always changes the
/// result; swapping pages or words changes it with overwhelming probability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checksum {
    state: u64,
    pages: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// An empty checksum; `Checksum::new().finish()` is the checksum of an
    /// empty region.
    pub const fn new() -> Self {
        Checksum {
            state: CHECKSUM_INIT,
            pages: 0,
        }
    }

    /// Feeds the next page.
    #[inline]
    pub fn update_page(&mut self, page: &[u64; PAGE_WORDS]) {
        let s = self.state;
        let mut lanes = [
            s ^ 0x0123_4567_89ab_cdef,
            s ^ 0x1032_5476_98ba_dcfe,
            s ^ 0x2301_6745_ab89_efcd,
            s ^ 0x3210_7654_ba98_fedc,
        ];
        for chunk in page.chunks_exact(4) {
            for (lane, &w) in lanes.iter_mut().zip(chunk) {
                *lane = (*lane ^ w).wrapping_mul(LANE_PRIME);
            }
        }
        let mut h = s;
        for lane in lanes {
            h = mix64(h ^ lane);
        }
        self.state = h;
        self.pages += 1;
    }

    /// The checksum of the pages fed so far (the pages count is folded in, so
    /// regions of different lengths differ even in degenerate cases).
    pub const fn finish(&self) -> u64 {
        mix64(self.state ^ self.pages.wrapping_mul(GOLDEN))
    }
}

impl Checksum {
    /// Feeds bytes as consecutive 4 KiB pages of little-endian words; a
    /// partial last page is padded with zero bytes. A sequence of calls
    /// equals one call on the concatenation only if every call but the last
    /// has a multiple of 4096 bytes.
    pub fn update_bytes(&mut self, data: &[u8]) {
        let mut page = [0u64; PAGE_WORDS];
        for chunk in data.chunks(PAGE_LEN) {
            page.fill(0);
            for (w, b) in page.iter_mut().zip(chunk.chunks(8)) {
                let mut bytes = [0u8; 8];
                bytes[..b.len()].copy_from_slice(b);
                *w = u64::from_le_bytes(bytes);
            }
            self.update_page(&page);
        }
    }
}

/// The checksum the probe reports for data it read from a disk
/// (`blk-read`): `data` cut into 4 KiB pages from its start, the last one
/// zero-padded, fed to [`Checksum`] as little-endian words.
pub fn checksum_bytes(data: &[u8]) -> u64 {
    let mut sum = Checksum::new();
    sum.update_bytes(data);
    sum.finish()
}

/// The checksum the probe reports for a region of `pages` pages of `domain`
/// keyed by `seed` (for `pages == 0`: `Checksum::new().finish()`).
pub fn expected_checksum(domain: u64, seed: u64, pages: u64) -> u64 {
    let mut sum = Checksum::new();
    let mut buf = [0u64; PAGE_WORDS];
    for page in 0..pages {
        fill_page(domain, seed, page, &mut buf);
        sum.update_page(&buf);
    }
    sum.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(domain: u64, seed: u64, n: u64) -> [u64; PAGE_WORDS] {
        let mut p = [0u64; PAGE_WORDS];
        fill_page(domain, seed, n, &mut p);
        p
    }

    #[test]
    fn deterministic() {
        assert_eq!(page(DOMAIN_SHARED, 7, 3), page(DOMAIN_SHARED, 7, 3));
        // Overwrites whatever was in the buffer.
        let mut p = [0xffff_ffff_ffff_ffffu64; PAGE_WORDS];
        fill_page(DOMAIN_SHARED, 7, 3, &mut p);
        assert_eq!(p, page(DOMAIN_SHARED, 7, 3));
        assert_eq!(
            expected_checksum(DOMAIN_UNIQUE, 42, 10),
            expected_checksum(DOMAIN_UNIQUE, 42, 10)
        );
    }

    #[test]
    fn seq_blocks_carry_marker_number_and_seed() {
        let mut a = [0u64; SECTOR_WORDS];
        let mut plain = [0u64; SECTOR_WORDS];
        seq_sector(9, 1234, &mut a);
        fill_sector(9, 1234, &mut plain);
        assert_eq!(a[..3], [SEQ_MARKER, 1234, 9]);
        assert_eq!(a[3..], plain[3..]);
        assert_eq!(SEQ_MARKER.to_le_bytes(), *b"KSMVMSEQ");
        let mut b = [0u64; SECTOR_WORDS];
        seq_sector(9, 1235, &mut b);
        assert_ne!(a[3..], b[3..]);
    }

    #[test]
    fn pinned_values() {
        // Guests and host tests of different builds must agree: pin the
        // stream so that an accidental change of the generator is noticed.
        let p = page(DOMAIN_SHARED, 0, 0);
        assert_eq!(p[0], 0x78aa_f07b_0918_1d85);
        assert_eq!(p[PAGE_WORDS - 1], 0x5a6e_afe0_7666_51d7);
        assert_eq!(Checksum::new().finish(), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(
            expected_checksum(DOMAIN_SHARED, 0, 0),
            Checksum::new().finish()
        );
        assert_eq!(
            expected_checksum(DOMAIN_SHARED, 0, 16),
            0xf29d_022c_f7ee_6af1
        );
        assert_eq!(
            expected_checksum(DOMAIN_UNIQUE, 1, 16),
            0x1840_bfc8_dd54_0c5e
        );
    }

    #[test]
    fn distinct_pages_seeds_domains() {
        let mut firsts = [0u64; 3 * 2 * 256];
        let mut n = 0;
        for domain in [DOMAIN_SHARED, DOMAIN_UNIQUE, 3] {
            for seed in [0u64, 1] {
                for pg in 0..256 {
                    let p = page(domain, seed, pg);
                    firsts[n] = p[0];
                    n += 1;
                }
            }
        }
        firsts.sort_unstable();
        for w in firsts.windows(2) {
            assert_ne!(w[0], w[1]);
        }
        assert_ne!(page(DOMAIN_SHARED, 5, 0), page(DOMAIN_UNIQUE, 5, 0));
        assert_ne!(page(DOMAIN_SHARED, 5, 0), page(DOMAIN_SHARED, 6, 0));
        assert_ne!(page(DOMAIN_SHARED, 5, 0), page(DOMAIN_SHARED, 5, 1));
    }

    #[test]
    fn words_within_page_vary() {
        let p = page(DOMAIN_UNIQUE, 1, 1);
        let mut words = p;
        words.sort_unstable();
        for w in words.windows(2) {
            assert_ne!(w[0], w[1]);
        }
    }

    #[test]
    fn never_all_zero() {
        for seed in 0..4 {
            for pg in 0..1024 {
                let p = page(DOMAIN_SHARED, seed, pg);
                assert!(p.iter().any(|&w| w != 0));
                assert_eq!(p[PAGE_WORDS - 1] & 1, 1);
            }
        }
    }

    #[test]
    fn checksum_detects_word_change() {
        let base = page(DOMAIN_SHARED, 3, 0);
        let second = page(DOMAIN_SHARED, 3, 1);
        let mut good = Checksum::new();
        good.update_page(&base);
        good.update_page(&second);
        let good = good.finish();
        assert_eq!(good, expected_checksum(DOMAIN_SHARED, 3, 2));
        for idx in [0usize, 1, 2, 3, 255, 510, 511] {
            for bit in [0u32, 17, 63] {
                let mut bad = base;
                bad[idx] ^= 1u64 << bit;
                let mut sum = Checksum::new();
                sum.update_page(&bad);
                sum.update_page(&second);
                assert_ne!(sum.finish(), good, "word {idx} bit {bit}");
            }
        }
    }

    #[test]
    fn checksum_is_order_dependent() {
        let a = page(DOMAIN_SHARED, 0, 0);
        let b = page(DOMAIN_SHARED, 0, 1);
        let mut ab = Checksum::new();
        ab.update_page(&a);
        ab.update_page(&b);
        let mut ba = Checksum::new();
        ba.update_page(&b);
        ba.update_page(&a);
        assert_ne!(ab.finish(), ba.finish());
        // Swapping two words within a page.
        let mut swapped = a;
        swapped.swap(0, 4);
        let mut s1 = Checksum::new();
        s1.update_page(&a);
        let mut s2 = Checksum::new();
        s2.update_page(&swapped);
        assert_ne!(s1.finish(), s2.finish());
    }

    #[test]
    fn fill_words_and_sectors_match_pages() {
        for seed in [0u64, 9] {
            for pg in [0u64, 1, 77] {
                let p = page(DOMAIN_BLOCK, seed, pg);
                let mut part = [0u64; 100];
                fill_words(DOMAIN_BLOCK, seed, pg, 412, &mut part);
                assert_eq!(part[..], p[412..]);
                fill_words(DOMAIN_BLOCK, seed, pg, 3, &mut part[..10]);
                assert_eq!(part[..10], p[3..13]);
                for s in 0..8 {
                    let mut sec = [0u64; SECTOR_WORDS];
                    fill_sector(seed, pg * 8 + s, &mut sec);
                    let at = usize::try_from(s).unwrap() * SECTOR_WORDS;
                    assert_eq!(sec[..], p[at..at + SECTOR_WORDS]);
                }
            }
        }
    }

    #[test]
    fn checksum_bytes_matches_pages() {
        let a = page(DOMAIN_SHARED, 1, 0);
        let b = page(DOMAIN_SHARED, 1, 1);
        let mut bytes = [0u8; 8192];
        for (i, w) in a.iter().chain(b.iter()).enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(
            checksum_bytes(&bytes),
            expected_checksum(DOMAIN_SHARED, 1, 2)
        );
        // A partial page is zero-padded.
        let mut padded = [0u64; PAGE_WORDS];
        padded[..64].copy_from_slice(&a[..64]);
        let mut sum = Checksum::new();
        sum.update_page(&padded);
        assert_eq!(checksum_bytes(&bytes[..512]), sum.finish());
        assert_eq!(checksum_bytes(&[]), Checksum::new().finish());
    }

    #[test]
    fn checksum_depends_on_length() {
        let zero = [0u64; PAGE_WORDS];
        let mut one = Checksum::new();
        one.update_page(&zero);
        let mut two = one.clone();
        two.update_page(&zero);
        assert_ne!(one.finish(), two.finish());
        assert_ne!(one.finish(), Checksum::new().finish());
        assert_ne!(
            expected_checksum(DOMAIN_SHARED, 0, 1),
            expected_checksum(DOMAIN_SHARED, 0, 2)
        );
    }
}
