//! memprofile: what KSM would see in two or more captured guest RAM images.
//!
//! ```text
//! memprofile [--json] [--page-size N] IMAGE IMAGE [IMAGE...]
//! ```
//!
//! Every image is read page by page (4 KiB by default). Each page of each
//! image falls into exactly one class:
//!
//! * `zero`        – all bytes zero (KSM: merged into the zero page, or never
//!                   resident at all when the guest never touched it).
//! * `same_offset` – non-zero, and the same content at the same offset in
//!                   every image (typically kernel text/data, page cache of
//!                   the shared root read in the same order).
//! * `shared_all`  – non-zero, not `same_offset`, but the content is present
//!                   (at any offset) in every other image.
//! * `shared_some` – the content is present in some, not all, other images
//!                   (only possible with three or more images).
//! * `dup_self`    – present in no other image, but at least twice in this one
//!                   (KSM merges those within one VM too).
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

struct Report {
    page_size: usize,
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
    for off in 0..max_len {
        let same = off < min_len && {
            let h0 = images[0][off];
            h0 != ZERO && images.iter().all(|im| im[off] == h0)
        };
        for (i, hashes) in images.iter().enumerate() {
            let Some(&h) = hashes.get(off) else { continue };
            let c = &mut per_image[i];
            c.pages += 1;
            if h == ZERO {
                c.zero += 1;
            } else if same {
                c.same_offset += 1;
            } else {
                let s = seen[&h];
                let others = s.images & !(1 << i);
                if others != 0 && s.images == all_mask {
                    c.shared_all += 1;
                } else if others != 0 {
                    c.shared_some += 1;
                } else if s.count > 1 {
                    c.dup_self += 1;
                } else {
                    c.unique += 1;
                }
            }
        }
    }
    let nonzero_total = per_image.iter().map(|c| c.pages - c.zero).sum();
    let distinct_nonzero = seen.len() as u64;
    let distinct_in_all = seen.values().filter(|s| s.images == all_mask).count() as u64;
    Report { page_size, names, per_image, nonzero_total, distinct_nonzero, distinct_in_all }
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
            "image", "total", "zero", "same_offset", "shared_all", "shared_some", "dup_self", "unique"
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
    eprintln!("usage: memprofile [--json] [--page-size N] IMAGE IMAGE [IMAGE...]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut json = false;
    let mut page_size = 4096usize;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json = true,
            "--page-size" => match args.next().and_then(|v| v.parse().ok()) {
                Some(v) if v >= 64 && v % 64 == 0 => page_size = v,
                _ => return usage(),
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
        assert_eq!((ca.pages, ca.zero, ca.same_offset, ca.shared_all), (6, 1, 1, 1));
        assert_eq!((ca.shared_some, ca.dup_self, ca.unique), (0, 2, 1));
        let cb = r.per_image[1];
        assert_eq!((cb.pages, cb.zero, cb.same_offset, cb.shared_all), (6, 2, 1, 1));
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
    fn zero_is_zero() {
        assert_eq!(page_hash(&page(0)), ZERO);
        assert_ne!(page_hash(&page(1)), ZERO);
    }
}
