//! The instance settings: one type that is both the `ksmvm run` flags
//! (clap, flattened into the run command) and an instance file's keys
//! (serde, TOML). Every field is optional, so that a flag overrides exactly
//! what it names; `resolve` fills in the defaults and validates.
//!
//! Adding a setting: a field here (its doc comment is the flag's help),
//! its line in `for_each_setting!`, and its use in `resolve`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::devices::{BalloonConfig, DiskConfig, NetConfig};
use super::{OnOff, ReadyMode, SeccompMode, SerialSink};

/// One instance file (`/etc/ksmvm/NAME.toml`) or the flags of `ksmvm run`.
/// The keys are the flags with `_` for `-` (`[[disk]]`, `[[net]]` and
/// `[balloon]` are tables with the keys of `--disk`, `--net` and
/// `--balloon`); unknown keys are errors.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// VM name (used for the API socket and in statistics) [default: the
    /// instance file's name, else "vm"].
    #[arg(long)]
    pub name: Option<String>,
    /// Guest kernel: an ELF vmlinux or a bzImage with a 64-bit entry point.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: serial console, reboot via i8042].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB [default: 256].
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Allow guest memory above the host's RAM + swap and more vCPUs than
    /// it has online CPUs (refused otherwise) [default: off].
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "on", value_name = "on|off")]
    pub allow_overcommit: Option<OnOff>,
    /// Mark guest memory MADV_MERGEABLE for KSM: on or off [default: on].
    #[arg(long)]
    pub ksm: Option<OnOff>,
    /// Guest serial output: stdout, file:PATH or none [default: stdout].
    /// On a stdout that is not a terminal (the journal, a pipe) every guest
    /// line is marked "guest: ".
    #[arg(long)]
    pub serial: Option<SerialSink>,
    /// Guest serial output allowed per second, in KiB; what comes faster
    /// (beyond --serial-burst-kib) is dropped and counted; 0: no limit
    /// [default: 64].
    #[arg(long, value_name = "KIB")]
    pub serial_rate_kib_s: Option<u64>,
    /// Guest serial output that may come at once above --serial-rate-kib-s,
    /// in KiB [default: 256].
    #[arg(long, value_name = "KIB")]
    pub serial_burst_kib: Option<u64>,
    /// With --serial file:PATH, the most PATH holds, in MiB: then it becomes
    /// PATH.1 (replacing the previous one) and PATH starts again; 0: no cap
    /// [default: 16].
    #[arg(long, value_name = "MIB")]
    pub serial_file_max_mib: Option<u64>,
    /// Control API socket (default: RUNTIME_DIR/NAME.sock, where RUNTIME_DIR
    /// is $KSMVM_RUNTIME_DIR or /run/ksmvm).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// A virtio-blk disk: path=FILE[,ro=on][,id=NAME] (repeatable; replaces
    /// the instance file's disks).
    #[arg(long, value_name = "path=FILE[,ro=on][,id=NAME]")]
    pub disk: Option<Vec<DiskConfig>>,
    /// A virtio-net device on an existing TAP: tap=NAME[,mac=MAC]
    /// (repeatable; replaces the instance file's nets).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    pub net: Option<Vec<NetConfig>>,
    /// A virtio balloon: [deflate-on-oom=on][,free-page-reporting=on][,stats-interval-s=N].
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "OPTIONS")]
    pub balloon: Option<BalloonConfig>,
    /// The virtio entropy device: on or off [default: on].
    #[arg(long)]
    pub rng: Option<OnOff>,
    /// Seconds a guest asked to shut down (SIGTERM: Ctrl-Alt-Del) may take
    /// before the VM is stopped; 0 stops it at once [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub shutdown_timeout_s: Option<u64>,
    /// When to tell systemd the VM is ready: running (vCPUs started) or
    /// guest (the guest printed --ready-marker) [default: running].
    #[arg(long)]
    pub ready: Option<ReadyMode>,
    /// Serial output that means the guest is up (for --ready guest).
    #[arg(long, value_name = "TEXT")]
    pub ready_marker: Option<String>,
    /// System-call filters per VMM thread: on (a forbidden call ends the
    /// VMM, naming the thread and the call), log (the kernel logs it and
    /// lets it through) or off [default: on].
    #[arg(long)]
    pub seccomp: Option<SeccompMode>,
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
        $m!(allow_overcommit);
        $m!(ksm);
        $m!(serial);
        $m!(serial_rate_kib_s);
        $m!(serial_burst_kib);
        $m!(serial_file_max_mib);
        $m!(api_sock);
        $m!(disk);
        $m!(net);
        $m!(balloon);
        $m!(rng);
        $m!(shutdown_timeout_s);
        $m!(ready);
        $m!(ready_marker);
        $m!(seccomp);
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

    /// The flags parse into the same type the file does.
    #[derive(clap::Parser, Debug)]
    struct Flags {
        #[command(flatten)]
        s: Settings,
    }

    #[test]
    fn flags_parse_into_settings() {
        use clap::Parser;
        let f = Flags::try_parse_from([
            "run",
            "--kernel",
            "/k",
            "--ksm",
            "off",
            "--rng",
            "true",
            "--disk",
            "path=/a",
            "--disk",
            "path=/b,ro=on",
            "--balloon",
            "--allow-overcommit",
        ])
        .unwrap();
        assert_eq!(f.s.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!(f.s.ksm, Some(OnOff::Off));
        assert_eq!(f.s.rng, Some(OnOff::On));
        assert_eq!(f.s.disk.as_ref().map(Vec::len), Some(2));
        assert_eq!(f.s.balloon, Some(BalloonConfig::default()));
        // A bare --allow-overcommit means on.
        assert_eq!(f.s.allow_overcommit, Some(OnOff::On));
        let f = Flags::try_parse_from(["run", "--allow-overcommit=off"]).unwrap();
        assert_eq!(f.s.allow_overcommit, Some(OnOff::Off));
        // Flags not given stay unset, so they override nothing.
        assert_eq!(f.s.net, None);
        assert_eq!(f.s.mem_mib, None);
        let e = Flags::try_parse_from(["run", "--ksm", "yes"]).unwrap_err();
        assert!(e.to_string().contains("expected on or off"), "{e}");
    }

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
