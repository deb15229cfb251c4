//! User-facing device options: `--disk`, `--net`, `--balloon` (`--rng` is
//! a plain on/off setting).
//!
//! Each is a `KEY=VALUE[,KEY=VALUE...]` list on the command line (parsed by
//! `FromStr`) and a table with the same keys in an instance file (serde), so
//! the two spellings cannot drift apart. Values that would only fail later
//! (a TAP name longer than IFNAMSIZ, a disk id longer than virtio allows)
//! are rejected here, while the user is still looking.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::OnOff;

mod rate;
pub use rate::{
    Rate, DEFAULT_DISK_BYTES_PER_S, DEFAULT_DISK_IOPS, DEFAULT_NET_BYTES_PER_S, DEFAULT_NET_PPS,
    NOTIFY_PER_S, RNG_BYTES_PER_S,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceConfigError {
    #[error("{0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("unknown option {key:?} (known: {known})")]
    UnknownKey { key: String, known: String },
    #[error("option {0:?} given twice")]
    Duplicate(String),
    #[error("missing option {0}=")]
    Missing(&'static str),
    #[error("{key}={value:?}: expected on or off")]
    Bool { key: String, value: String },
    #[error("{key}={value:?}: expected a whole number")]
    Number { key: String, value: String },
    #[error("{key}={value:?}: expected a rate such as 0 (unlimited), 20000, 512K, 200M or 1G")]
    Rate { key: String, value: String },
    #[error("path= is empty")]
    EmptyPath,
    #[error("disk id {0:?}: use 1-20 printable ASCII characters (the virtio-blk serial)")]
    DiskId(String),
    #[error("TAP name {0:?}: use 1-15 characters, no '/', ':' or whitespace")]
    TapName(String),
    #[error("MAC address {0:?}: expected six hex bytes such as 06:00:ac:10:00:02")]
    Mac(String),
    #[error("MAC address {0}: a NIC needs a unicast address (first byte even)")]
    MulticastMac(MacAddr),
}

type Result<T> = std::result::Result<T, DeviceConfigError>;

/// Splits `a=1,b=2` and checks every key against `known`.
fn parse_kv<'a>(s: &'a str, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| DeviceConfigError::NotKeyValue(item.to_owned()))?;
        if !known.contains(&k) {
            return Err(DeviceConfigError::UnknownKey {
                key: k.to_owned(),
                known: known.join(", "),
            });
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(DeviceConfigError::Duplicate(k.to_owned()));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// The one on/off parser (`OnOff`), naming the option on error.
fn parse_bool(key: &str, value: &str) -> Result<bool> {
    value
        .parse::<OnOff>()
        .map(bool::from)
        .map_err(|_| DeviceConfigError::Bool {
            key: key.to_owned(),
            value: value.to_owned(),
        })
}

fn on_off(b: bool) -> OnOff {
    OnOff::from(b)
}

/// The virtio-blk serial (VIRTIO_BLK_T_GET_ID): at most 20 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DiskId(String);

impl DiskId {
    pub const MAX_LEN: usize = 20;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DiskId {
    type Error = DeviceConfigError;
    fn try_from(s: String) -> Result<Self> {
        let ok =
            !s.is_empty() && s.len() <= Self::MAX_LEN && s.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(DiskId(s))
        } else {
            Err(DeviceConfigError::DiskId(s))
        }
    }
}

impl From<DiskId> for String {
    fn from(id: DiskId) -> String {
        id.0
    }
}

/// `--disk path=FILE[,ro=on][,id=NAME][,bw=RATE][,iops=RATE]`: a raw disk
/// image, with its bandwidth and request rate limits (see [`Rate`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default, rename = "ro")]
    pub read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<DiskId>,
    /// Bytes per second read and written; default [`DEFAULT_DISK_BYTES_PER_S`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw: Option<Rate>,
    /// Requests per second; default [`DEFAULT_DISK_IOPS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<Rate>,
}

impl DiskConfig {
    /// A disk with every option at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            id: None,
            bw: None,
            iops: None,
        }
    }

    /// The bandwidth limit in bytes per second; None is unlimited.
    pub fn bytes_per_s(&self) -> Option<u64> {
        Rate::or_default(self.bw, DEFAULT_DISK_BYTES_PER_S)
    }

    /// The request rate limit; None is unlimited.
    pub fn ops_per_s(&self) -> Option<u64> {
        Rate::or_default(self.iops, DEFAULT_DISK_IOPS)
    }
}

/// Writes `,key=rate` for the rates that were given.
fn write_rates(f: &mut fmt::Formatter<'_>, rates: &[(&str, Option<Rate>)]) -> fmt::Result {
    for (key, rate) in rates {
        if let Some(r) = rate {
            write!(f, ",{key}={r}")?;
        }
    }
    Ok(())
}

impl FromStr for DiskConfig {
    type Err = DeviceConfigError;
    fn from_str(s: &str) -> Result<Self> {
        let mut path = None;
        let mut d = DiskConfig::new("");
        for (k, v) in parse_kv(s, &["path", "ro", "id", "bw", "iops"])? {
            match k {
                "path" if v.is_empty() => return Err(DeviceConfigError::EmptyPath),
                "path" => path = Some(PathBuf::from(v)),
                "ro" => d.read_only = parse_bool(k, v)?,
                "bw" => d.bw = Some(Rate::parse_option(k, v)?),
                "iops" => d.iops = Some(Rate::parse_option(k, v)?),
                _ => d.id = Some(DiskId::try_from(v.to_owned())?),
            }
        }
        d.path = path.ok_or(DeviceConfigError::Missing("path"))?;
        Ok(d)
    }
}

impl fmt::Display for DiskConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "path={},ro={}",
            self.path.display(),
            on_off(self.read_only)
        )?;
        if let Some(id) = &self.id {
            write!(f, ",id={}", id.as_str())?;
        }
        write_rates(f, &[("bw", self.bw), ("iops", self.iops)])
    }
}

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A stable, locally administered unicast address derived from `seed`
    /// (the TAP name), so that a guest keeps its address across restarts
    /// without the user picking one.
    pub fn derived_from(seed: &str) -> MacAddr {
        // FNV-1a: tiny, stable across Rust versions (unlike DefaultHasher).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        // 0x06: locally administered (bit 1), unicast (bit 0 clear).
        MacAddr([0x06, b[0], b[1], b[2], b[3], b[4]])
    }
}

impl FromStr for MacAddr {
    type Err = DeviceConfigError;
    fn from_str(s: &str) -> Result<Self> {
        let err = || DeviceConfigError::Mac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        let mac = MacAddr(out);
        if out[0] & 1 != 0 {
            return Err(DeviceConfigError::MulticastMac(mac));
        }
        Ok(mac)
    }
}

impl TryFrom<String> for MacAddr {
    type Error = DeviceConfigError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

/// The name of an existing TAP interface: at most IFNAMSIZ - 1 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TapName(String);

impl TapName {
    pub const MAX_LEN: usize = libc::IFNAMSIZ - 1;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TapName {
    type Error = DeviceConfigError;
    fn try_from(s: String) -> Result<Self> {
        // The kernel's dev_valid_name(), which TUNSETIFF applies.
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
        if ok {
            Ok(TapName(s))
        } else {
            Err(DeviceConfigError::TapName(s))
        }
    }
}

impl From<TapName> for String {
    fn from(t: TapName) -> String {
        t.0
    }
}

/// `--net tap=NAME[,mac=MAC][,bw=RATE][,pps=RATE][,mac-filter=on|off]`: a
/// virtio-net NIC on an existing TAP device, with the limits of each
/// direction (see [`Rate`]) and whether frames the guest sends from another
/// source MAC than its own are dropped (on by default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub tap: TapName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Bytes per second in each direction; default [`DEFAULT_NET_BYTES_PER_S`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bw: Option<Rate>,
    /// Frames per second in each direction; default [`DEFAULT_NET_PPS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pps: Option<Rate>,
    #[serde(
        default,
        rename = "mac-filter",
        skip_serializing_if = "Option::is_none"
    )]
    pub mac_filter: Option<OnOff>,
}

impl NetConfig {
    /// A NIC on `tap` with every option at its default.
    pub fn new(tap: TapName) -> Self {
        Self {
            tap,
            mac: None,
            bw: None,
            pps: None,
            mac_filter: None,
        }
    }

    /// The bandwidth limit of each direction; None is unlimited.
    pub fn bytes_per_s(&self) -> Option<u64> {
        Rate::or_default(self.bw, DEFAULT_NET_BYTES_PER_S)
    }

    /// The frame rate limit of each direction; None is unlimited.
    pub fn frames_per_s(&self) -> Option<u64> {
        Rate::or_default(self.pps, DEFAULT_NET_PPS)
    }

    /// Whether TX frames with a foreign source MAC are dropped.
    pub fn filters_source_mac(&self) -> bool {
        self.mac_filter.unwrap_or(OnOff::On).is_on()
    }

    /// The guest's MAC: the configured one, or one derived from the TAP name.
    pub fn mac_or_default(&self) -> MacAddr {
        self.mac
            .unwrap_or_else(|| MacAddr::derived_from(self.tap.as_str()))
    }
}

impl FromStr for NetConfig {
    type Err = DeviceConfigError;
    fn from_str(s: &str) -> Result<Self> {
        let mut tap = None;
        let (mut mac, mut bw, mut pps, mut mac_filter) = (None, None, None, None);
        for (k, v) in parse_kv(s, &["tap", "mac", "bw", "pps", "mac-filter"])? {
            match k {
                "tap" => tap = Some(TapName::try_from(v.to_owned())?),
                "bw" => bw = Some(Rate::parse_option(k, v)?),
                "pps" => pps = Some(Rate::parse_option(k, v)?),
                "mac-filter" => mac_filter = Some(on_off(parse_bool(k, v)?)),
                _ => mac = Some(v.parse()?),
            }
        }
        Ok(NetConfig {
            mac,
            bw,
            pps,
            mac_filter,
            ..NetConfig::new(tap.ok_or(DeviceConfigError::Missing("tap"))?)
        })
    }
}

impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tap={}", self.tap.as_str())?;
        if let Some(mac) = self.mac {
            write!(f, ",mac={mac}")?;
        }
        write_rates(f, &[("bw", self.bw), ("pps", self.pps)])?;
        if let Some(filter) = self.mac_filter {
            write!(f, ",mac-filter={filter}")?;
        }
        Ok(())
    }
}

/// `--balloon [deflate-on-oom=on][,free-page-reporting=on][,stats-interval-s=N]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct BalloonConfig {
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back
    /// from the balloon instead of invoking its OOM killer.
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING: the guest reports free pages, which
    /// the host drops (MADV_DONTNEED).
    pub free_page_reporting: bool,
    /// How often to ask the guest for memory statistics; 0 turns the
    /// statistics queue off.
    pub stats_interval_s: u32,
}

impl FromStr for BalloonConfig {
    type Err = DeviceConfigError;
    fn from_str(s: &str) -> Result<Self> {
        let mut cfg = BalloonConfig::default();
        let known = ["deflate-on-oom", "free-page-reporting", "stats-interval-s"];
        for (k, v) in parse_kv(s, &known)? {
            match k {
                "deflate-on-oom" => cfg.deflate_on_oom = parse_bool(k, v)?,
                "free-page-reporting" => cfg.free_page_reporting = parse_bool(k, v)?,
                _ => {
                    cfg.stats_interval_s = v.parse().map_err(|_| DeviceConfigError::Number {
                        key: k.to_owned(),
                        value: v.to_owned(),
                    })?
                }
            }
        }
        Ok(cfg)
    }
}

impl fmt::Display for BalloonConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "deflate-on-oom={},free-page-reporting={},stats-interval-s={}",
            on_off(self.deflate_on_oom),
            on_off(self.free_page_reporting),
            self.stats_interval_s
        )
    }
}

/// The VM's virtio devices as configured, in the order the guest sees
/// them: disks, nets, the balloon, the entropy device.
///
/// Adding a device: its option type in this file and its field here, its
/// `Settings` field (the flag and the instance file key), and its model
/// under `devices/virtio/` with its line in `devices::virtio::create`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeviceSet {
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub balloon: Option<BalloonConfig>,
    pub rng: bool,
}

impl DeviceSet {
    /// The devices `s` names, with the defaults for what it leaves out
    /// (no disks, nets or balloon; the entropy device on).
    pub fn from_settings(s: &super::Settings) -> Self {
        Self {
            disks: s.disk.clone().unwrap_or_default(),
            nets: s.net.clone().unwrap_or_default(),
            balloon: s.balloon.clone(),
            rng: s.rng.unwrap_or(OnOff::On).is_on(),
        }
    }
}

#[cfg(test)]
mod tests;
