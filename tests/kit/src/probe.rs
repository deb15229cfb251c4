//! The probe guest's side: `ksmvm run` arguments that boot it, the fields
//! of its `PROBE ...` lines, and the memory images it replays.

use std::io::Write;
use std::path::Path;

/// `ksmvm run` arguments that boot the probe ([`crate::probe`]) with
/// `console=ttyS0 CMDLINE` and the extra VMM flags.
pub fn probe_args(cmdline: &str, extra: &[&str]) -> Vec<String> {
    let probe = crate::probe();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        probe.display().to_string(),
        "--cmdline".into(),
        format!("console=ttyS0 {cmdline}"),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    args
}

/// The value of a `key=value` field of a probe line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// A field parsed as `T` (None if absent or not a `T`).
pub fn parse_field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    field(line, key)?.parse().ok()
}

/// A hexadecimal field (with or without `0x`).
///
/// # Panics
/// When the field is absent or not hexadecimal.
pub fn hex_field(line: &str, key: &str) -> u64 {
    let v = field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    u64::from_str_radix(v.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("{key}={v} is not hex in {line:?}"))
}

/// The kernel's rendering of an e820 entry ksmvm logged (`addr=.. size=..`).
pub fn kernel_e820_line(l: &str) -> String {
    let addr = hex_field(l, "addr");
    let size = hex_field(l, "size");
    format!(
        "BIOS-e820: [mem {addr:#018x}-{:#018x}] usable",
        addr + size - 1
    )
}

/// Writes `pack` (a `KSMVMRAM` memory image with known content) to `path`.
///
/// # Panics
/// When the file cannot be written.
pub fn write_pack(path: &Path, pack: &probe_pattern::pack::SyntheticPack) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create pack"));
    pack.write(|bytes| out.write_all(bytes).expect("write pack"));
    out.flush().expect("write pack");
}
