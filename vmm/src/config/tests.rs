use std::path::Path;

use std::time::Duration;

use super::*;

/// A host whose KVM allows two vCPUs, with 8 GiB of RAM and swap and 4
/// online CPUs (so that the KVM limit is the one the vCPU tests meet).
const HOST: HostLimits = HostLimits {
    max_vcpus: 2,
    capacity: HostCapacity {
        mem_bytes: Some(8 << 30),
        cpus: Some(4),
    },
};

/// A host with 2 GiB of RAM and swap and 2 online CPUs, KVM allowing 64.
const SMALL_HOST: HostLimits = HostLimits {
    max_vcpus: 64,
    capacity: HostCapacity {
        mem_bytes: Some(2 << 30),
        cpus: Some(2),
    },
};

/// A kernel path that exists on every Linux host.
const KERNEL: &str = "/proc/self/exe";

fn parse(text: &str) -> Result<InstanceFile, String> {
    InstanceFile::parse(Path::new("/etc/ksmvm/t.toml"), text.to_owned()).map_err(|e| e.to_string())
}

fn resolve_text(text: &str, flags: Settings) -> Result<Instance, String> {
    let file = parse(text)?;
    resolve(Some(&file), flags, &HOST).map_err(|e| e.to_string())
}

#[test]
fn full_file_resolves() {
    let text = format!(
        r#"
name = "probe-1"
kernel = "{KERNEL}"
cmdline = "console=ttyS0"
mem_mib = 96
vcpus = 2
ksm = false
serial = "file:/var/log/ksmvm/probe-1.log"
shutdown_timeout_s = 20
ready = "guest"
ready_marker = "PROBE READY"
"#
    );
    let i = resolve_text(&text, Settings::default()).unwrap();
    assert_eq!(i.vm.name, "probe-1");
    assert_eq!(i.vm.mem_mib, 96);
    assert_eq!(i.vm.vcpus, 2);
    assert!(!i.vm.ksm);
    assert_eq!(
        i.vm.serial,
        SerialSink::File("/var/log/ksmvm/probe-1.log".into())
    );
    assert_eq!(i.service.shutdown_timeout, Duration::from_secs(20));
    assert_eq!(i.service.ready, ReadyMode::Guest);
    assert_eq!(i.service.ready_marker.as_deref(), Some("PROBE READY"));
}

#[test]
fn defaults_and_name_from_file() {
    let i = resolve_text(&format!("kernel = \"{KERNEL}\""), Settings::default()).unwrap();
    assert_eq!(i.vm.name, "t");
    assert_eq!(i.vm.mem_mib, DEFAULT_MEM_MIB);
    assert_eq!(i.vm.vcpus, DEFAULT_VCPUS);
    assert!(i.vm.ksm);
    assert_eq!(i.vm.serial, SerialSink::Stdout);
    assert_eq!(
        i.vm.serial_limits,
        SerialLimits {
            rate_bytes_s: 64 << 10,
            burst_bytes: 256 << 10,
            file_max_bytes: 16 << 20,
        }
    );
    // A graceful stop by default (ksmvm@.service's TimeoutStopSec= fits it).
    assert_eq!(i.service.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(i.service.ready, ReadyMode::Running);
}

#[test]
fn shutdown_timeout_zero_still_means_at_once() {
    let text = format!("kernel = \"{KERNEL}\"\nshutdown_timeout_s = 0\n");
    let i = resolve_text(&text, Settings::default()).unwrap();
    assert_eq!(i.service.shutdown_timeout, Duration::ZERO);
}

#[test]
fn serial_bounds_from_file_and_flags() {
    let text = format!(
        "kernel = \"{KERNEL}\"\nserial_rate_kib_s = 8\nserial_burst_kib = 32\nserial_file_max_mib = 0\n"
    );
    let i = resolve_text(&text, Settings::default()).unwrap();
    assert_eq!(
        i.vm.serial_limits,
        SerialLimits {
            rate_bytes_s: 8 << 10,
            burst_bytes: 32 << 10,
            file_max_bytes: 0,
        }
    );
    let flags = Settings {
        serial_rate_kib_s: Some(0),
        ..Default::default()
    };
    let i = resolve_text(&text, flags).unwrap();
    assert_eq!(i.vm.serial_limits.rate_bytes_s, 0, "0: no limit");
}

#[test]
fn bad_serial_bounds_name_the_key() {
    let bad = |extra: &str| {
        resolve_text(
            &format!("kernel = \"{KERNEL}\"\n{extra}\n"),
            Settings::default(),
        )
        .unwrap_err()
    };
    let e = bad("serial_burst_kib = 0");
    assert!(
        e.starts_with(
            "/etc/ksmvm/t.toml:2:20: serial_burst_kib: a burst of 0 KiB lets no serial output through"
        ),
        "{e}"
    );
    // With no rate limit the burst does not matter.
    resolve_text(
        &format!("kernel = \"{KERNEL}\"\nserial_rate_kib_s = 0\nserial_burst_kib = 0\n"),
        Settings::default(),
    )
    .unwrap();
    let e = bad("serial_rate_kib_s = 2000000");
    assert!(
        e.starts_with("/etc/ksmvm/t.toml:2:21: serial_rate_kib_s: 2000000 KiB/s is too large: at most 1048576 KiB/s (0: no limit)"),
        "{e}"
    );
    let e = bad("serial_file_max_mib = 9999999");
    assert!(
        e.contains("serial_file_max_mib: 9999999 MiB is too large"),
        "{e}"
    );
    let e = bad("serial_burst_kib = -1");
    assert!(
        e.starts_with("/etc/ksmvm/t.toml:2:20: serial_burst_kib: invalid value"),
        "{e}"
    );
    let flags = Settings {
        serial_burst_kib: Some(0),
        ..Default::default()
    };
    let e = resolve_text(&format!("kernel = \"{KERNEL}\""), flags).unwrap_err();
    assert!(e.starts_with("--serial-burst-kib: a burst of 0 KiB"), "{e}");
}

#[test]
fn flags_override_the_file() {
    let flags = Settings {
        mem_mib: Some(128),
        name: Some("other".into()),
        ..Default::default()
    };
    let text = format!("kernel = \"{KERNEL}\"\nmem_mib = 64\nvcpus = 2\n");
    let i = resolve_text(&text, flags).unwrap();
    assert_eq!(i.vm.mem_mib, 128);
    assert_eq!(i.vm.vcpus, 2);
    assert_eq!(i.vm.name, "other");
}

#[test]
fn unknown_key_names_file_line_column_and_key() {
    let e = parse("kernel = \"/k\"\nmemory = 64\n").unwrap_err();
    assert!(
        e.starts_with("/etc/ksmvm/t.toml:2:1: memory: unknown field `memory`"),
        "{e}"
    );
}

#[test]
fn wrong_type_names_the_key() {
    let e = parse("kernel = \"/k\"\nmem_mib = \"lots\"\n").unwrap_err();
    assert!(
        e.starts_with("/etc/ksmvm/t.toml:2:11: mem_mib: invalid type"),
        "{e}"
    );
    let e = parse("serial = \"tty\"\n").unwrap_err();
    assert!(
        e.starts_with("/etc/ksmvm/t.toml:1:10: serial: invalid serial sink"),
        "{e}"
    );
    let e = parse("ready = \"soon\"\n").unwrap_err();
    assert!(
        e.starts_with("/etc/ksmvm/t.toml:1:9: ready: unknown variant"),
        "{e}"
    );
}

#[test]
fn syntax_error_has_a_position() {
    let e = parse("kernel = \n").unwrap_err();
    assert!(e.starts_with("/etc/ksmvm/t.toml:1:"), "{e}");
}

#[test]
fn out_of_range_value_points_into_the_file() {
    let text = format!("kernel = \"{KERNEL}\"\n\nmem_mib = 1\n");
    let e = resolve_text(&text, Settings::default()).unwrap_err();
    assert!(
        e.starts_with("/etc/ksmvm/t.toml:3:11: mem_mib: guest memory of 1 MiB is too small"),
        "{e}"
    );
    let text = format!("kernel = \"{KERNEL}\"\nvcpus = 9\n");
    let e = resolve_text(&text, Settings::default()).unwrap_err();
    assert!(
        e.starts_with("/etc/ksmvm/t.toml:2:9: vcpus: 9 vCPUs"),
        "{e}"
    );
}

#[test]
fn a_bad_flag_is_named_as_a_flag() {
    let flags = Settings {
        vcpus: Some(0),
        ..Default::default()
    };
    let e = resolve_text(&format!("kernel = \"{KERNEL}\"\nvcpus = 1\n"), flags).unwrap_err();
    assert_eq!(e, "--vcpus: a VM needs at least one vCPU");
}

#[test]
fn missing_and_unreadable_kernel() {
    let e = resolve_text("mem_mib = 64", Settings::default()).unwrap_err();
    assert!(e.contains("no guest kernel"), "{e}");
    let e = resolve_text("kernel = \"/nonexistent/vmlinux\"", Settings::default()).unwrap_err();
    assert!(
        e.starts_with(
            "/etc/ksmvm/t.toml:1:10: kernel: cannot open kernel /nonexistent/vmlinux: No such file"
        ),
        "{e}"
    );
    let e = resolve(None, Settings::default(), &HOST)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("ksmvm run: no guest kernel"), "{e}");
}

#[test]
fn guest_ready_needs_a_marker_and_timeout_is_bounded() {
    let e = resolve_text(
        &format!("kernel = \"{KERNEL}\"\nready = \"guest\"\n"),
        Settings::default(),
    )
    .unwrap_err();
    assert!(
        e.starts_with("/etc/ksmvm/t.toml:2:9: ready: ready = \"guest\" needs a ready_marker"),
        "{e}"
    );
    let e = resolve_text(
        &format!("kernel = \"{KERNEL}\"\nready_marker = \"\"\n"),
        Settings::default(),
    )
    .unwrap_err();
    assert!(
        e.contains("ready_marker: the ready marker must not be empty"),
        "{e}"
    );
    let e = resolve_text(
        &format!("kernel = \"{KERNEL}\"\nshutdown_timeout_s = 99999\n"),
        Settings::default(),
    )
    .unwrap_err();
    assert!(e.contains("shutdown_timeout_s: 99999 s is too long"), "{e}");
}

#[test]
fn relative_kernel_is_relative_to_the_file() {
    let file =
        InstanceFile::parse(Path::new("/proc/self/t.toml"), "kernel = \"exe\"".into()).unwrap();
    assert_eq!(
        file.settings.kernel.as_deref(),
        Some(Path::new("/proc/self/exe"))
    );
}

#[test]
fn shipped_examples_parse() {
    for (name, text) in [
        (
            "probe.toml",
            include_str!("../../systemd/examples/probe.toml"),
        ),
        (
            "mastodon.toml",
            include_str!("../../systemd/examples/mastodon.toml"),
        ),
    ] {
        let f = InstanceFile::parse(Path::new(name), text.to_owned())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(f.settings.kernel.is_some(), "{name}");
        if name == "mastodon.toml" {
            let disks = f.settings.disk.as_ref().unwrap();
            assert_eq!(disks.len(), 2);
            assert!(disks[0].read_only && !disks[1].read_only);
            assert_eq!(f.settings.net.as_ref().unwrap().len(), 1);
            assert!(f.settings.balloon.as_ref().unwrap().free_page_reporting);
        }
        assert_eq!(f.settings.ready, Some(ReadyMode::Guest), "{name}");
    }
    crate::ksm::parse_tuning(include_str!("../../systemd/examples/ksm.toml"))
        .unwrap_or_else(|e| panic!("ksm.toml: {e}"))
        .validate()
        .unwrap_or_else(|e| panic!("ksm.toml: {e}"));
}

#[test]
fn devices_and_api_socket() {
    let dir = std::env::temp_dir().join(format!("ksmvm-inst-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("root.img"), b"").unwrap();
    let text = format!(
        "kernel = \"{KERNEL}\"\napi_sock = \"api.sock\"\nrng = false\n\n\
         [[disk]]\npath = \"root.img\"\nro = true\n\n\
         [[disk]]\npath = \"missing.img\"\n\n\
         [[net]]\ntap = \"tap0\"\n\n\
         [balloon]\ndeflate-on-oom = true\n"
    );
    let file = InstanceFile::parse(&dir.join("vm1.toml"), text.clone()).unwrap();
    // The second disk does not exist: the error points at its path.
    let e = resolve(Some(&file), Settings::default(), &HOST)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("vm1.toml:10:8: disk[1].path: cannot open disk"),
        "{e}"
    );
    // --disk flags replace the file's disks.
    let flags = Settings {
        disk: Some(vec![format!("path={}", dir.join("root.img").display())
            .parse()
            .unwrap()]),
        ..Default::default()
    };
    let i = resolve(Some(&file), flags, &HOST).unwrap();
    let d = &i.vm.devices;
    assert_eq!(d.disks.len(), 1);
    assert!(!d.disks[0].read_only);
    assert_eq!(d.nets.len(), 1);
    assert!(d.balloon.as_ref().unwrap().deflate_on_oom);
    assert!(!d.rng);
    assert_eq!(i.api_sock, dir.join("api.sock"));
    let e = parse("[[disk]]\npath = \"/x\"\nsize = 3\n").unwrap_err();
    assert!(
        e.starts_with("/etc/ksmvm/t.toml:3:1: disk[0].size: unknown field `size`"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn default_api_socket_is_named_after_the_vm() {
    let i = resolve_text(&format!("kernel = \"{KERNEL}\""), Settings::default()).unwrap();
    assert_eq!(i.api_sock, crate::instance::socket_path("t"));
}

#[test]
fn a_disk_that_is_no_file_or_block_device_is_named_for_what_it_is() {
    let flags = |path: &str| Settings {
        kernel: Some(KERNEL.into()),
        disk: Some(vec![format!("path={path}").parse().unwrap()]),
        ..Default::default()
    };
    let e = |path: &str| resolve(None, flags(path), &HOST).unwrap_err().to_string();
    assert_eq!(
        e("/proc"),
        "--disk: cannot open disk /proc: it is a directory, not a regular file or block device"
    );
    assert_eq!(
        e("/dev/null"),
        "--disk: cannot open disk /dev/null: it is a character device, not a regular file or block device"
    );
    // A symlink is followed: /proc/self/exe is a regular file.
    resolve(None, flags(KERNEL), &HOST).unwrap();
}

#[test]
fn a_guest_above_the_host_names_the_flag_or_key() {
    let on_small = |text: &str, flags: Settings| {
        let file = parse(text).unwrap();
        resolve(Some(&file), flags, &SMALL_HOST).map_err(|e| e.to_string())
    };
    let text = format!("kernel = \"{KERNEL}\"\nmem_mib = 4096\nvcpus = 2\n");
    let e = on_small(&text, Settings::default()).unwrap_err();
    assert!(
        e.starts_with(
            "/etc/ksmvm/t.toml:2:11: mem_mib: guest memory of 4096 MiB is more than this host can ever back: 2048 MiB"
        ),
        "{e}"
    );
    let flags = Settings {
        vcpus: Some(3),
        mem_mib: Some(2048),
        ..Default::default()
    };
    let e = on_small(&text, flags).unwrap_err();
    assert!(
        e.starts_with("--vcpus: 3 vCPUs requested, but this host has 2 online CPUs"),
        "{e}"
    );
    // The file's key and the flag both allow it; the flag overrides the file.
    let allowed = format!("{text}allow_overcommit = true\n");
    let i = on_small(&allowed, Settings::default()).unwrap();
    assert!(i.vm.allow_overcommit);
    assert_eq!(i.vm.mem_mib, 4096);
    let flags = Settings {
        allow_overcommit: Some(OnOff::On),
        vcpus: Some(16),
        ..Default::default()
    };
    assert_eq!(on_small(&text, flags).unwrap().vm.vcpus, 16);
    let flags = Settings {
        allow_overcommit: Some(OnOff::Off),
        ..Default::default()
    };
    assert!(
        on_small(&allowed, flags).is_err(),
        "--allow-overcommit=off wins"
    );
    // Off by default.
    let i = resolve_text(&format!("kernel = \"{KERNEL}\""), Settings::default()).unwrap();
    assert!(!i.vm.allow_overcommit);
}
