//! Rate limits in the device options: `bw=` (bytes per second), `iops=`,
//! `pps=` (operations per second).
//!
//! A value is a whole number with an optional `K`, `M` or `G` suffix
//! (powers of 1024) or `0` for unlimited; an instance file may give it as a
//! TOML integer or string. Every device gets a default (below) so that one
//! guest cannot take more than a fair share of a host shared by many; a
//! hoster raises or lifts them per device.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::DeviceConfigError;

/// Disk bandwidth a guest gets unless its `--disk` says otherwise.
pub const DEFAULT_DISK_BYTES_PER_S: u64 = 256 << 20;
/// Disk requests per second (reads, writes, flushes, discards).
pub const DEFAULT_DISK_IOPS: u64 = 20_000;
/// Bandwidth of each direction of a NIC (about 1 Gbit/s).
pub const DEFAULT_NET_BYTES_PER_S: u64 = 128 << 20;
/// Frames per second in each direction of a NIC.
pub const DEFAULT_NET_PPS: u64 = 20_000;
/// Entropy a guest may draw (Linux takes a few hundred bytes at boot).
pub const RNG_BYTES_PER_S: u64 = 1 << 20;
/// Queue notifications one device may make the VMM serve per second.
/// Throttling them only delays service (chains that arrive meanwhile are
/// served together), so a well-behaved guest never notices.
pub const NOTIFY_PER_S: u64 = 20_000;

/// A per-second rate; 0 is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RateRepr", into = "u64")]
pub struct Rate(pub u64);

impl Rate {
    /// `self`, or None for unlimited.
    pub fn limit(self) -> Option<u64> {
        (self.0 > 0).then_some(self.0)
    }

    /// The rate `given`, or `default` when none was given.
    pub fn or_default(given: Option<Rate>, default: u64) -> Option<u64> {
        given.unwrap_or(Rate(default)).limit()
    }

    /// Parses the value of option `key` (named in the error).
    pub fn parse_option(key: &str, s: &str) -> Result<Rate, DeviceConfigError> {
        let err = || DeviceConfigError::Rate {
            key: key.to_owned(),
            value: s.to_owned(),
        };
        let (digits, shift) = match s.as_bytes().last() {
            Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
            Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
            Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
            _ => (s, 0),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        n.checked_mul(1 << shift).map(Rate).ok_or_else(err)
    }
}

impl FromStr for Rate {
    type Err = DeviceConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_option("rate", s)
    }
}

impl fmt::Display for Rate {
    /// The shortest exact spelling: `256M`, `20000`, `0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
            if n != 0 && n % (1 << shift) == 0 {
                return write!(f, "{}{suffix}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RateRepr {
    Int(u64),
    Str(String),
}

impl TryFrom<RateRepr> for Rate {
    type Error = DeviceConfigError;
    fn try_from(r: RateRepr) -> Result<Self, Self::Error> {
        match r {
            RateRepr::Int(n) => Ok(Rate(n)),
            RateRepr::Str(s) => s.parse(),
        }
    }
}

impl From<Rate> for u64 {
    fn from(r: Rate) -> u64 {
        r.0
    }
}
