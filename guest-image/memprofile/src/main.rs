//! memprofile: what KSM would see in two or more captured guest RAM images.
//!
//! ```text
//! memprofile [--json] [--page-size N] [--pack FILE] IMAGE IMAGE [IMAGE...]
//! ```
//!
//! `--pack FILE` also writes the first image's non-zero pages, with their
//! class, in the `KSMVMRAM` format (see `write_pack`): a file a VMM can load
//! verbatim as an initrd for a probe guest that reproduces the image's
//! memory composition.
//!
//! Every image is read page by page (4 KiB by default). Each page of each
//! image falls into exactly one class:
//!
//! * `zero`        – all bytes zero (KSM: merged into the zero page, or never
//!   resident at all when the guest never touched it).
//! * `same_offset` – non-zero, and the same content at the same offset in
//!   every image (typically kernel text/data, page cache of
//!   the shared root read in the same order).
//! * `shared_all`  – non-zero, not `same_offset`, but the content is present
//!   (at any offset) in every other image.
//! * `shared_some` – the content is present in some, not all, other images
//!   (only possible with three or more images).
//! * `dup_self`    – present in no other image, but at least twice in this one
//!   (KSM merges those within one VM too).
//! * `unique`      – the content occurs exactly once in all images.
//!
//! It also reports the number of distinct non-zero contents over all images:
//! the pages KSM would need after a complete merge, against the non-zero pages
//! before it. Pages are compared by a 128-bit hash (two keyed SipHash-2-4
//! passes), so accidental collisions are out of the question in practice.

use std::collections::HashMap;
use std::fs::File;
use std::hash::Hasher;
use std::io::{self, BufReader, Read};
use std::process::ExitCode;

const ZERO: u128 = 0;

#[derive(Default, Clone, Copy)]
struct Counts {
    pages: u64,
    zero: u64,
    same_offset: u64,
    shared_all: u64,
    shared_some: u64,
    dup_self: u64,
    unique: u64,
}

/// Per-content bookkeeping: total occurrences and a bitmask of images (up
/// to 64 images).
#[derive(Default, Clone, Copy)]
struct Seen {
    count: u32,
    images: u64,
}

#[allow(deprecated)]
fn page_hash(page: &[u8]) -> u128 {
    if page.iter().all(|&b| b == 0) {
        return ZERO;
    }
    let mut a = std::hash::SipHasher::new_with_keys(0x6b73_6d76_6d5f_6d65, 0x6d70_726f_6669_6c65);
    let mut b = std::hash::SipHasher::new_with_keys(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
    a.write(page);
    b.write(page);
    let h = ((a.finish() as u128) << 64) | b.finish() as u128;
    // Keep 0 reserved for the zero page.
    if h == ZERO {
        1
    } else {
        h
    }
}

fn read_hashes(path: &str, page_size: usize) -> io::Result<Vec<u128>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len == 0 || len % page_size as u64 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: size {len} is not a positive multiple of the page size {page_size}"),
        ));
    }
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut page = vec![0u8; page_size];
    let mut hashes = Vec::with_capacity((len / page_size as u64) as usize);
    for _ in 0..len / page_size as u64 {
        reader.read_exact(&mut page)?;
        hashes.push(page_hash(&page));
    }
    Ok(hashes)
}

/// Page classes, as stored in a pack's page table (0 is never stored).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Class {
    Zero = 0,
    SameOffset = 1,
    SharedAll = 2,
    SharedSome = 3,
    DupSelf = 4,
    Unique = 5,
}

struct Report {
    page_size: usize,
    /// Class of every page of the first image (for --pack).
    first_classes: Vec<Class>,
    names: Vec<String>,
    per_image: Vec<Counts>,
    /// Non-zero pages over all images (resident before merging, if touched).
    nonzero_total: u64,
    /// Distinct non-zero contents over all images (resident after a full merge).
    distinct_nonzero: u64,
    /// Distinct contents present in every image.
    distinct_in_all: u64,
}

fn analyse(names: Vec<String>, images: &[Vec<u128>], page_size: usize) -> Report {
    let n = images.len();
    let all_mask: u64 = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    let mut seen: HashMap<u128, Seen> = HashMap::new();
    for (i, hashes) in images.iter().enumerate() {
        for &h in hashes {
            if h == ZERO {
                continue;
            }
            let e = seen.entry(h).or_default();
            e.count += 1;
            e.images |= 1 << i;
        }
    }
    let max_len = images.iter().map(Vec::len).max().unwrap_or(0);
    let min_len = images.iter().map(Vec::len).min().unwrap_or(0);
    let mut per_image = vec![Counts::default(); n];
    let mut first_classes = Vec::with_capacity(images[0].len());
    for off in 0..max_len {
        let same = off < min_len && {
            let h0 = images[0][off];
            h0 != ZERO && images.iter().all(|im| im[off] == h0)
        };
        for (i, hashes) in images.iter().enumerate() {
            let Some(&h) = hashes.get(off) else { continue };
            let c = &mut per_image[i];
            c.pages += 1;
            let class = if h == ZERO {
                c.zero += 1;
                Class::Zero
            } else if same {
                c.same_offset += 1;
                Class::SameOffset
            } else {
                let s = seen[&h];
                let others = s.images & !(1 << i);
                if others != 0 && s.images == all_mask {
                    c.shared_all += 1;
                    Class::SharedAll
                } else if others != 0 {
                    c.shared_some += 1;
                    Class::SharedSome
                } else if s.count > 1 {
                    c.dup_self += 1;
                    Class::DupSelf
                } else {
                    c.unique += 1;
                    Class::Unique
                }
            };
            if i == 0 {
                first_classes.push(class);
            }
        }
    }
    let nonzero_total = per_image.iter().map(|c| c.pages - c.zero).sum();
    let distinct_nonzero = seen.len() as u64;
    let distinct_in_all = seen.values().filter(|s| s.images == all_mask).count() as u64;
    Report {
        page_size,
        first_classes,
        names,
        per_image,
        nonzero_total,
        distinct_nonzero,
        distinct_in_all,
    }
}

impl Report {
    fn mib(&self, pages: u64) -> f64 {
        pages as f64 * self.page_size as f64 / (1024.0 * 1024.0)
    }

    fn print_text(&self) {
        let ps = self.page_size;
        println!("page size {ps} B, {} images; MiB (pages)", self.names.len());
        println!(
            "{:<28} {:>16} {:>16} {:>16} {:>16} {:>16} {:>16} {:>16}",
            "image",
            "total",
            "zero",
            "same_offset",
            "shared_all",
            "shared_some",
            "dup_self",
            "unique"
        );
        for (name, c) in self.names.iter().zip(&self.per_image) {
            let cell = |p: u64| format!("{:.1} ({})", self.mib(p), p);
            let short = name.rsplit('/').next().unwrap_or(name);
            println!(
                "{:<28} {:>16} {:>16} {:>16} {:>16} {:>16} {:>16} {:>16}",
                short,
                cell(c.pages),
                cell(c.zero),
                cell(c.same_offset),
                cell(c.shared_all),
                cell(c.shared_some),
                cell(c.dup_self),
                cell(c.unique)
            );
        }
        let n = self.names.len() as f64;
        println!();
        println!(
            "non-zero pages, all images: {:.1} MiB; distinct non-zero contents: {:.1} MiB \
             (what a complete KSM merge leaves resident, plus one zero page)",
            self.mib(self.nonzero_total),
            self.mib(self.distinct_nonzero)
        );
        println!(
            "contents present in every image: {:.1} MiB (stored once after merging)",
            self.mib(self.distinct_in_all)
        );
        println!(
            "mean per image: non-zero {:.1} MiB before merging, {:.1} MiB after (= shared/{} + own)",
            self.mib(self.nonzero_total) / n,
            self.mib(self.distinct_nonzero) / n,
            self.names.len()
        );
    }

    fn print_json(&self) {
        let mut out = String::from("{\n");
        out += &format!("  \"page_size\": {},\n  \"images\": [\n", self.page_size);
        for (k, (name, c)) in self.names.iter().zip(&self.per_image).enumerate() {
            out += &format!(
                "    {{\"path\": {}, \"pages\": {}, \"zero\": {}, \"same_offset\": {}, \"shared_all\": {}, \
                 \"shared_some\": {}, \"dup_self\": {}, \"unique\": {}}}{}\n",
                json_str(name),
                c.pages,
                c.zero,
                c.same_offset,
                c.shared_all,
                c.shared_some,
                c.dup_self,
                c.unique,
                if k + 1 < self.names.len() { "," } else { "" }
            );
        }
        out += &format!(
            "  ],\n  \"nonzero_total\": {},\n  \"distinct_nonzero\": {},\n  \"distinct_in_all\": {}\n}}",
            self.nonzero_total, self.distinct_nonzero, self.distinct_in_all
        );
        println!("{out}");
    }
}

/// Writes the non-zero pages of `image` (the first image of the report) as a
/// `KSMVMRAM` pack, all integers little-endian:
///
/// ```text
/// offset 0, one page_size block: header
///   0  8  magic "KSMVMRAM"
///   8  4  version (1)
///  12  4  page_size
///  16  8  source_pages: pages in the captured image (its RAM size / page_size)
///  24  8  n: pages stored
///  32  8  shared: how many of them come first with class 1, 2 or 3
///  40  8  zero pages in the source (not stored)
///  48  ..  zero
/// page table: n u64 entries, padded with zeros to a multiple of page_size:
///   bits 0..=55 the page's frame number in the source (guest-physical
///   address / page_size), bits 56..=63 its class: 1 same_offset,
///   2 shared_all, 3 shared_some, 4 dup_self, 5 unique
/// page data: n pages in table order, shared classes first, then 4 and 5,
///   each in ascending source address
/// ```
///
/// Every page starts page-aligned in the file, so a VMM that loads the file
/// page-aligned (as an initrd) gives each page its own guest page.
fn write_pack(path: &str, image: &str, classes: &[Class], page_size: usize) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut order: Vec<usize> = (0..classes.len())
        .filter(|&i| classes[i] != Class::Zero)
        .collect();
    order.sort_by_key(|&i| (classes[i] as u8 >= Class::DupSelf as u8, i));
    let shared = order
        .iter()
        .filter(|&&i| (classes[i] as u8) < Class::DupSelf as u8)
        .count();
    let zero = classes.iter().filter(|&&c| c == Class::Zero).count();

    let mut header = vec![0u8; page_size];
    header[0..8].copy_from_slice(b"KSMVMRAM");
    header[8..12].copy_from_slice(&1u32.to_le_bytes());
    header[12..16].copy_from_slice(&(page_size as u32).to_le_bytes());
    header[16..24].copy_from_slice(&(classes.len() as u64).to_le_bytes());
    header[24..32].copy_from_slice(&(order.len() as u64).to_le_bytes());
    header[32..40].copy_from_slice(&(shared as u64).to_le_bytes());
    header[40..48].copy_from_slice(&(zero as u64).to_le_bytes());
    let mut table = Vec::with_capacity(order.len() * 8);
    for &i in &order {
        table.extend_from_slice(&((i as u64) | ((classes[i] as u64) << 56)).to_le_bytes());
    }
    table.resize(table.len().div_ceil(page_size) * page_size, 0);

    let mut src = File::open(image)?;
    let mut out = io::BufWriter::with_capacity(1 << 20, File::create(path)?);
    out.write_all(&header)?;
    out.write_all(&table)?;
    let mut page = vec![0u8; page_size];
    for &i in &order {
        src.seek(SeekFrom::Start((i * page_size) as u64))?;
        src.read_exact(&mut page)?;
        out.write_all(&page)?;
    }
    out.flush()
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o += "\\\"",
            '\\' => o += "\\\\",
            c if (c as u32) < 0x20 => o += &format!("\\u{:04x}", c as u32),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn usage() -> ExitCode {
    eprintln!("usage: memprofile [--json] [--page-size N] [--pack FILE] IMAGE IMAGE [IMAGE...]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut json = false;
    let mut page_size = 4096usize;
    let mut pack = None;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--page-size" => match args.next().and_then(|v| v.parse().ok()) {
                Some(v) if v >= 64 && v % 64 == 0 => page_size = v,
                _ => return usage(),
            },
            "--pack" => match args.next() {
                Some(v) => pack = Some(v),
                None => return usage(),
            },
            "-h" | "--help" => {
                usage();
                return ExitCode::SUCCESS;
            }
            _ if a.starts_with('-') => return usage(),
            _ => paths.push(a),
        }
    }
    if paths.len() < 2 || paths.len() > 64 {
        eprintln!("memprofile: need between 2 and 64 images");
        return usage();
    }
    let mut images = Vec::new();
    for p in &paths {
        match read_hashes(p, page_size) {
            Ok(h) => images.push(h),
            Err(e) => {
                eprintln!("memprofile: {p}: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let report = analyse(paths, &images, page_size);
    if let Some(out) = &pack {
        if let Err(e) = write_pack(out, &report.names[0], &report.first_classes, page_size) {
            eprintln!("memprofile: {out}: {e}");
            return ExitCode::from(1);
        }
    }
    if json {
        report.print_json();
    } else {
        report.print_text();
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; 64]
    }

    fn hashes(pages: &[Vec<u8>]) -> Vec<u128> {
        pages.iter().map(|p| page_hash(p)).collect()
    }

    #[test]
    fn classes() {
        // image a: zero, X (same offset), Y, U1, D, D
        // image b: zero, X (same offset), Z, Y, U2, zero
        let a = hashes(&[page(0), page(1), page(2), page(3), page(9), page(9)]);
        let b = hashes(&[page(0), page(1), page(4), page(2), page(5), page(0)]);
        let r = analyse(vec!["a".into(), "b".into()], &[a, b], 64);
        let ca = r.per_image[0];
        assert_eq!(
            (ca.pages, ca.zero, ca.same_offset, ca.shared_all),
            (6, 1, 1, 1)
        );
        assert_eq!((ca.shared_some, ca.dup_self, ca.unique), (0, 2, 1));
        let cb = r.per_image[1];
        assert_eq!(
            (cb.pages, cb.zero, cb.same_offset, cb.shared_all),
            (6, 2, 1, 1)
        );
        assert_eq!((cb.shared_some, cb.dup_self, cb.unique), (0, 0, 2));
        // distinct non-zero: 1, 2, 3, 9, 4, 5
        assert_eq!(r.distinct_nonzero, 6);
        assert_eq!(r.nonzero_total, 5 + 4);
        assert_eq!(r.distinct_in_all, 2);
    }

    #[test]
    fn shared_some_needs_three() {
        let a = hashes(&[page(1), page(2)]);
        let b = hashes(&[page(2), page(3)]);
        let c = hashes(&[page(4), page(2)]);
        let r = analyse(vec!["a".into(), "b".into(), "c".into()], &[a, b, c], 64);
        // page(2) is in all three at different offsets; page(1), 3, 4 unique.
        assert_eq!(r.per_image[0].shared_all, 1);
        assert_eq!(r.per_image[0].unique, 1);
        let a = hashes(&[page(1), page(2)]);
        let b = hashes(&[page(2), page(3)]);
        let c = hashes(&[page(4), page(5)]);
        let r = analyse(vec!["a".into(), "b".into(), "c".into()], &[a, b, c], 64);
        assert_eq!(r.per_image[0].shared_some, 1);
        assert_eq!(r.per_image[2].unique, 2);
    }

    #[test]
    fn pack_layout() {
        let dir = std::env::temp_dir().join(format!("memprofile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        let b = dir.join("b");
        // a: U, zero, S(at 2 in a, 0 in b); b: S, V, zero
        let mut ia = page(7);
        ia.extend(page(0));
        ia.extend(page(3));
        let mut ib = page(3);
        ib.extend(page(8));
        ib.extend(page(0));
        std::fs::write(&a, &ia).unwrap();
        std::fs::write(&b, &ib).unwrap();
        let (sa, sb) = (
            a.to_str().unwrap().to_string(),
            b.to_str().unwrap().to_string(),
        );
        let images = [read_hashes(&sa, 64).unwrap(), read_hashes(&sb, 64).unwrap()];
        let r = analyse(vec![sa.clone(), sb], &images, 64);
        assert_eq!(
            r.first_classes,
            vec![Class::Unique, Class::Zero, Class::SharedAll]
        );
        let out = dir.join("pack");
        write_pack(out.to_str().unwrap(), &sa, &r.first_classes, 64).unwrap();
        let p = std::fs::read(&out).unwrap();
        assert_eq!(&p[0..8], b"KSMVMRAM");
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap());
        assert_eq!(
            (u64_at(16), u64_at(24), u64_at(32), u64_at(40)),
            (3, 2, 1, 1)
        );
        // table at 64: shared page (frame 2, class 2) first, then unique (frame 0, class 5)
        assert_eq!(u64_at(64), 2 | (2 << 56));
        assert_eq!(u64_at(72), 5 << 56);
        assert_eq!(p.len(), 64 + 64 + 2 * 64);
        assert_eq!(&p[128..192], &page(3)[..]);
        assert_eq!(&p[192..256], &page(7)[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zero_is_zero() {
        assert_eq!(page_hash(&page(0)), ZERO);
        assert_ne!(page_hash(&page(1)), ZERO);
    }
}
