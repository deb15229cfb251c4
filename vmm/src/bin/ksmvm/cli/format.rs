//! Human-readable numbers for the CLI tables.

use ksmvm::stats::ApproxF64;

const KIB: f64 = 1024.0;

/// Binary units with one decimal: `512B`, `1.5K`, `64.0M`, `2.0G`.
pub fn bytes(v: u64) -> String {
    signed_bytes(i128::from(v))
}

pub fn signed_bytes(v: i128) -> String {
    let sign = if v < 0 { "-" } else { "" };
    // Above 2^64 bytes a table cell may as well saturate.
    let mut x = u64::try_from(v.unsigned_abs())
        .unwrap_or(u64::MAX)
        .approx_f64();
    if x < KIB {
        return format!("{sign}{x}B");
    }
    for unit in ["K", "M", "G", "T"] {
        x /= KIB;
        if x < KIB || unit == "T" {
            return format!("{sign}{x:.1}{unit}");
        }
    }
    unreachable!("the loop returns at T")
}

pub fn opt_bytes(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), bytes)
}

pub fn opt_signed(v: Option<i64>) -> String {
    v.map_or_else(|| "-".into(), |v| signed_bytes(v.into()))
}

/// Left-aligned columns separated by two spaces (last column unpadded).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_bytes() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(1536), "1.5K");
        assert_eq!(bytes(64 << 20), "64.0M");
        assert_eq!(signed_bytes(-(3 << 30)), "-3.0G");
        assert_eq!(opt_bytes(None), "-");
    }

    #[test]
    fn aligns_tables() {
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }
}
