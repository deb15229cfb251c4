//! The instance settings as written in a TOML file or given as flags: every
//! field optional, so that a flag can override exactly what it names.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ReadyMode;
use crate::config::SerialSink;
use crate::devices::virtio::{BalloonConfig, DiskConfig, NetConfig};

/// One instance file (`/etc/ksmvm/NAME.toml`). The keys are the `ksmvm run`
/// flags with `_` for `-` (`[[disk]]`, `[[net]]` and `[balloon]` are tables
/// with the keys of `--disk`, `--net` and `--balloon`); unknown keys are
/// errors.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub name: Option<String>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub mem_mib: Option<u64>,
    pub vcpus: Option<u32>,
    pub ksm: Option<bool>,
    pub serial: Option<SerialSink>,
    pub api_sock: Option<PathBuf>,
    /// `--disk` flags replace the whole list, as do `--net` flags.
    pub disk: Option<Vec<DiskConfig>>,
    pub net: Option<Vec<NetConfig>>,
    pub balloon: Option<BalloonConfig>,
    pub rng: Option<bool>,
    pub shutdown_timeout_s: Option<u64>,
    pub ready: Option<ReadyMode>,
    pub ready_marker: Option<String>,
}

/// Invokes `$m!(field)` for every field, so that per-field code (overlay,
/// which-key-was-given) cannot forget one.
macro_rules! for_each_setting {
    ($m:ident) => {
        $m!(name);
        $m!(kernel);
        $m!(initrd);
        $m!(cmdline);
        $m!(mem_mib);
        $m!(vcpus);
        $m!(ksm);
        $m!(serial);
        $m!(api_sock);
        $m!(disk);
        $m!(net);
        $m!(balloon);
        $m!(rng);
        $m!(shutdown_timeout_s);
        $m!(ready);
        $m!(ready_marker);
    };
}

impl Settings {
    /// `self` with every value `over` has replaced by that value.
    pub fn overlay(mut self, over: Settings) -> Settings {
        macro_rules! take {
            ($f:ident) => {
                if over.$f.is_some() {
                    self.$f = over.$f;
                }
            };
        }
        for_each_setting!(take);
        self
    }

    /// Whether the key (named as in the file) has a value.
    pub fn has(&self, key: &str) -> bool {
        macro_rules! check {
            ($f:ident) => {
                if key == stringify!($f) {
                    return self.$f.is_some();
                }
            };
        }
        for_each_setting!(check);
        false
    }

    /// Makes relative paths relative to `dir` (the instance file's folder),
    /// not to whatever directory the VMM happens to start in.
    pub fn anchor_paths(&mut self, dir: &Path) {
        let anchor = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(p) = self.kernel.as_mut() {
            anchor(p);
        }
        if let Some(p) = self.initrd.as_mut() {
            anchor(p);
        }
        if let Some(SerialSink::File(p)) = self.serial.as_mut() {
            anchor(p);
        }
        if let Some(p) = self.api_sock.as_mut() {
            anchor(p);
        }
        for d in self.disk.iter_mut().flatten() {
            anchor(&mut d.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_takes_only_given_values() {
        let file = Settings {
            kernel: Some("/k".into()),
            mem_mib: Some(64),
            vcpus: Some(2),
            ..Default::default()
        };
        let flags = Settings {
            mem_mib: Some(128),
            ..Default::default()
        };
        let s = file.overlay(flags);
        assert_eq!(s.mem_mib, Some(128));
        assert_eq!(s.vcpus, Some(2));
        assert_eq!(s.kernel.as_deref(), Some(Path::new("/k")));
        assert!(s.has("vcpus") && !s.has("initrd") && !s.has("nonsense"));
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let mut s = Settings {
            kernel: Some("vmlinux".into()),
            initrd: Some("/abs/initrd".into()),
            serial: Some(SerialSink::File("log/serial.log".into())),
            disk: Some(vec!["path=data.img".parse().unwrap()]),
            ..Default::default()
        };
        s.anchor_paths(Path::new("/etc/ksmvm"));
        assert_eq!(s.kernel.as_deref(), Some(Path::new("/etc/ksmvm/vmlinux")));
        assert_eq!(s.initrd.as_deref(), Some(Path::new("/abs/initrd")));
        assert_eq!(
            s.serial,
            Some(SerialSink::File("/etc/ksmvm/log/serial.log".into()))
        );
        assert_eq!(s.disk.unwrap()[0].path, Path::new("/etc/ksmvm/data.img"));
    }
}
