//! ksmvm under a real systemd: the shipped units, with the probe guest, in
//! a systemd that runs as PID 1 of its own namespaces (see
//! tests/systemd/container.rs). Needs root, /dev/kvm and the cached Debian
//! rootfs (built on first use by tests/systemd/make-rootfs.sh, about a
//! minute); with CI=true a missing requirement fails the test.
//!
//! One test drives all scenarios in turn, so that the container boots once.

#[path = "systemd/cgroup.rs"]
mod cgroup;
#[path = "systemd/container.rs"]
mod container;

use std::path::Path;
use std::time::{Duration, Instant};

use container::{Container, Item, Out};
use ksmvm_testkit::*;

const T: Duration = Duration::from_secs(30);
/// The probe's shutdown_timeout_s: it ignores Ctrl-Alt-Del, so every stop
/// takes this long.
const SHUTDOWN_S: u64 = 3;

fn unit_file(name: &str) -> Vec<u8> {
    std::fs::read(repo_root().join("vmm/systemd").join(name))
        .unwrap_or_else(|e| panic!("cannot read vmm/systemd/{name}: {e}"))
}

fn probe_config() -> String {
    format!(
        "kernel = \"/usr/lib/ksmvm/probe\"\n\
         cmdline = \"console=ttyS0 probe.shared=4\"\n\
         mem_mib = 48\n\
         shutdown_timeout_s = {SHUTDOWN_S}\n\
         ready = \"guest\"\n\
         ready_marker = \"PROBE READY\"\n"
    )
}

fn have_tools() -> bool {
    let ok = ["unshare", "nsenter", "mount", "chroot"].iter().all(|t| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    require(ok, "unshare, nsenter, mount and chroot (util-linux)")
}

struct Sd<'a>(&'a Container);

impl Sd<'_> {
    fn run(&self, cmd: &str) -> Out {
        self.0.sh(cmd, T)
    }

    /// Runs `cmd`, failing the test (with the command's output) unless it succeeds.
    fn ok(&self, cmd: &str) -> String {
        let out = self.run(cmd);
        assert!(
            out.ok(),
            "`{cmd}` failed ({:?}):\n{}\n{}",
            out.code,
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    fn prop(&self, unit: &str, prop: &str) -> String {
        self.ok(&format!("systemctl show -p {prop} --value {unit}"))
            .trim()
            .to_owned()
    }

    fn journal(&self, unit: &str) -> String {
        self.ok(&format!("journalctl --no-pager -o cat -u {unit}"))
    }

    /// Polls until `f` holds; fails with `what` and the unit's journal otherwise.
    fn wait_until(&self, unit: &str, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !f() {
            assert!(
                Instant::now() < deadline,
                "{unit}: {what} did not happen within {timeout:?}; journal:\n{}",
                self.journal(unit)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn assert_active(&self, unit: &str) {
        let state = self.prop(unit, "ActiveState");
        assert_eq!(state, "active", "{unit}; journal:\n{}", self.journal(unit));
    }
}

/// `systemctl start` returns only after READY=1, which (ready = "guest")
/// comes after the guest printed its marker; STATUS= shows the memory line.
fn start_waits_for_the_guest(sd: &Sd) {
    let t0 = Instant::now();
    sd.ok("systemctl start ksmvm@probe");
    eprintln!("start ksmvm@probe: {:?}", t0.elapsed());
    sd.assert_active("ksmvm@probe");
    let journal = sd.journal("ksmvm@probe");
    let at = |needle: &str| {
        journal
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("journal lacks {needle:?}:\n{journal}"))
    };
    assert!(
        at("PROBE READY") < at("the guest printed its ready marker")
            && at("the guest printed its ready marker") < at("Started ksmvm@probe"),
        "READY=1 must follow the guest's marker:\n{journal}"
    );
    let status = sd.ok("systemctl status --no-pager --lines=0 ksmvm@probe");
    assert!(
        status.contains("Status: \"running; guest RAM 48 MiB: resident "),
        "{status}"
    );
    // The API socket is there once the unit is active.
    sd.ok("test -S /run/ksmvm/probe.sock");
    // The VMM's own log lines carry journald priorities (info = 6).
    sd.ok("journalctl --no-pager -o cat -p info -u ksmvm@probe | grep -q 'VM probe running'");
    let debug_only = sd
        .run("journalctl --no-pager -o cat -p notice -u ksmvm@probe | grep -q 'VM probe running'");
    assert!(
        !debug_only.ok(),
        "info lines must not be logged at notice or above"
    );
    // Guest lines are marked, at the stream's default priority (info).
    let probe_lines: Vec<&str> = journal.lines().filter(|l| l.contains("PROBE ")).collect();
    assert!(
        !probe_lines.is_empty() && probe_lines.iter().all(|l| l.starts_with("guest: PROBE ")),
        "{journal}"
    );
    sd.ok("journalctl --no-pager -o cat -p info -u ksmvm@probe | grep -q '^guest: PROBE READY$'");
    let above_info =
        sd.run("journalctl --no-pager -o cat -p notice -u ksmvm@probe | grep -q '^guest: '");
    assert!(!above_info.ok(), "guest lines must be logged at info");
}

/// A VMM killed with SIGKILL is restarted (Restart=on-failure).
fn sigkill_restarts(sd: &Sd) {
    let old = sd.prop("ksmvm@probe", "MainPID");
    sd.ok(&format!("kill -KILL {old}"));
    sd.wait_until("ksmvm@probe", "a restart after SIGKILL", T, || {
        sd.prop("ksmvm@probe", "NRestarts") == "1"
            && sd.prop("ksmvm@probe", "ActiveState") == "active"
    });
    assert_ne!(sd.prop("ksmvm@probe", "MainPID"), old);
}

/// stop: Ctrl-Alt-Del to the guest, the probe ignores it, the VMM stops the
/// VM after shutdown_timeout_s and exits 0.
fn stop_asks_the_guest_then_times_out(sd: &Sd) {
    let t0 = Instant::now();
    sd.ok("systemctl stop ksmvm@probe");
    let took = t0.elapsed();
    eprintln!("stop ksmvm@probe: {took:?}");
    let journal = sd.journal("ksmvm@probe");
    assert!(
        journal.contains("received SIGTERM: asking the guest to shut down (Ctrl-Alt-Del)"),
        "{journal}"
    );
    assert!(
        journal.contains(&format!(
            "the guest did not shut down within {SHUTDOWN_S} s; stopping the VM"
        )),
        "{journal}"
    );
    assert!(
        took >= Duration::from_secs(SHUTDOWN_S) && took < Duration::from_secs(SHUTDOWN_S + 10),
        "stop took {took:?}"
    );
    assert_eq!(sd.prop("ksmvm@probe", "Result"), "success");
    assert_eq!(sd.prop("ksmvm@probe", "ExecMainStatus"), "0");
    assert_eq!(sd.prop("ksmvm@probe", "ActiveState"), "inactive");
    // The VMM removed its API socket on the way out.
    sd.ok("test ! -e /run/ksmvm/probe.sock");
}

/// A VMM that stops sending WATCHDOG=1 (fault injection) is aborted and
/// restarted by systemd.
fn silent_watchdog_restarts(sd: &Sd) {
    sd.ok("systemctl start ksmvm@wd");
    sd.wait_until("ksmvm@wd", "a watchdog restart", T, || {
        sd.prop("ksmvm@wd", "NRestarts") != "0"
    });
    let journal = sd.journal("ksmvm@wd");
    assert!(
        journal.contains("fault injection: no longer sending WATCHDOG=1"),
        "{journal}"
    );
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    sd.ok("systemctl stop ksmvm@wd");
}

/// Three instances of the template side by side.
fn three_instances(sd: &Sd) {
    let units = ["ksmvm@a", "ksmvm@b", "ksmvm@c"];
    sd.ok(&format!("systemctl start {}", units.join(" ")));
    let pids_by_unit: Vec<String> = units
        .iter()
        .map(|u| {
            sd.assert_active(u);
            sd.prop(u, "MainPID")
        })
        .collect();
    let mut pids = pids_by_unit.clone();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 3, "three VMMs: {pids:?}");
    for (u, name) in units.iter().zip(["a", "b", "c"]) {
        let j = sd.journal(u);
        assert!(j.contains(&format!("VM {name} running")), "{j}");
    }
    // `ksmvm list` finds all three through their sockets in /run/ksmvm.
    let list: serde_json::Value =
        serde_json::from_str(&sd.ok("ksmvm list --json")).expect("ksmvm list --json");
    let rows = list.as_array().expect("a JSON array");
    for (u, name) in units.iter().zip(["a", "b", "c"]) {
        let row = rows
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("ksmvm list lacks {name}: {list}"));
        assert_eq!(row["state"], "running", "{row}");
        assert_eq!(row["pid"].to_string(), sd.prop(u, "MainPID"), "{row}");
        assert!(row.get("error").is_none(), "{row}");
        assert!(row["resident_bytes"].is_u64(), "{row}");
    }
    // The cheap statistics path (mincore, within 2 s of the last full
    // sample) and the STATUS= refresh (every 5 s) run inside the unit's
    // system call filter without killing the VMM.
    sd.ok("ksmvm list --json");
    std::thread::sleep(Duration::from_secs(6));
    for (u, pid) in units.iter().zip(&pids_by_unit) {
        sd.assert_active(u);
        assert_eq!(&sd.prop(u, "MainPID"), pid, "{u} was restarted");
        let status = sd.prop(u, "StatusText");
        assert!(
            status.starts_with("running; guest RAM 48 MiB: resident "),
            "{u}: {status}"
        );
    }
    sd.ok(&format!("systemctl stop {}", units.join(" ")));
    for u in units {
        assert_eq!(sd.prop(u, "ExecMainStatus"), "0", "{u}");
    }
}

/// A data disk in /var/lib/ksmvm and a TAP device work inside the unit's
/// sandbox (DeviceAllow=/dev/net/tun, CAP_NET_ADMIN, StateDirectory=), and
/// the disk is flushed when the VM stops.
fn devices_in_the_sandbox(sd: &Sd) {
    let tap =
        sd.0.host_in_netns(&["ip", "tuntap", "add", "dev", "ksmvmtap0", "mode", "tap"]);
    assert!(tap.ok(), "cannot create a TAP in the container: {tap:?}");
    sd.ok("systemctl start ksmvm@dev");
    sd.assert_active("ksmvm@dev");
    sd.ok("systemctl stop ksmvm@dev");
    assert_eq!(sd.prop("ksmvm@dev", "ExecMainStatus"), "0");
    let j = sd.journal("ksmvm@dev");
    assert!(
        j.contains("flushed disk /var/lib/ksmvm/dev-data.img"),
        "{j}"
    );
    assert!(!j.contains("error"), "{j}");
}

/// ksmvm-ksm.service applies /etc/ksmvm/ksm.toml through its sandbox. The
/// file holds the host's current values (read under the KSM host lock), so
/// the host's KSM is written but not changed.
fn ksm_tuning_applies(sd: &Sd) {
    let Some(_lock) = ksm_lock(Duration::from_secs(60)) else {
        // Only outside CI: another process (a benchmark) holds KSM for longer.
        require(false, "the KSM host lock within 60 s");
        return;
    };
    let knob = |k: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{k}"))
            .expect("read KSM knob")
            .trim()
            .to_owned()
    };
    let toml = format!(
        "pages_to_scan = {}\nsleep_millisecs = {}\n",
        knob("pages_to_scan"),
        knob("sleep_millisecs")
    );
    sd.ok(&format!("printf '%s' '{toml}' > /etc/ksmvm/ksm.toml"));
    sd.ok("systemctl restart ksmvm-ksm");
    assert_eq!(sd.prop("ksmvm-ksm", "Result"), "success");
    let j = sd.journal("ksmvm-ksm");
    assert!(j.contains("applied /etc/ksmvm/ksm.toml"), "{j}");
}

/// The KSM host lock (see `ksmvm::ksm::HostLock`), waited for at most
/// `timeout` so that a long benchmark cannot stall this test.
fn ksm_lock(timeout: Duration) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(ksmvm::ksm::HostLock::default_path())
        .ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: flock(2) on a file this function owns; released when it is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Some(file);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ksmvm_units_under_a_real_systemd() {
    if !(require(is_root(), "root (namespaces, mounts, cgroups)") && have_kvm() && have_tools()) {
        return;
    }
    let t0 = Instant::now();
    let rootfs = match container::rootfs(&repo_root()) {
        Ok(r) => r,
        Err(e) => {
            require(false, &format!("the Debian rootfs for systemd ({e})"));
            return;
        }
    };
    let probe = probe();
    let ksmvm = ksmvm();
    let config = probe_config();
    let (unit, ksm_unit) = (unit_file("ksmvm@.service"), unit_file("ksmvm-ksm.service"));
    // Fault injection for the watchdog instance only, with a short
    // WatchdogSec and no core dump of the aborted VMM.
    let wd_dropin = b"[Service]\nWatchdogSec=2s\nLimitCORE=0\nEnvironment=KSMVM_DEBUG_STOP_WATCHDOG_AFTER_S=2\n";
    let mut items = vec![
        Item::File {
            path: "/etc/systemd/system/ksmvm@.service",
            contents: &unit,
        },
        Item::File {
            path: "/etc/systemd/system/ksmvm-ksm.service",
            contents: &ksm_unit,
        },
        Item::File {
            path: "/etc/systemd/system/ksmvm@wd.service.d/test.conf",
            contents: wd_dropin,
        },
        Item::Bind {
            host: ksmvm,
            path: "/usr/bin/ksmvm",
        },
        Item::Bind {
            host: &probe,
            path: "/usr/lib/ksmvm/probe",
        },
        Item::Bind {
            host: Path::new("/dev/kvm"),
            path: "/dev/kvm",
        },
    ];
    let dev_config = format!(
        "{config}\n[[disk]]\npath = \"/var/lib/ksmvm/dev-data.img\"\nid = \"data\"\n\n\
         [[net]]\ntap = \"ksmvmtap0\"\n"
    );
    let data_disk = vec![0u8; 1 << 20];
    items.push(Item::File {
        path: "/etc/ksmvm/dev.toml",
        contents: dev_config.as_bytes(),
    });
    items.push(Item::File {
        path: "/var/lib/ksmvm/dev-data.img",
        contents: &data_disk,
    });
    let names = ["probe", "wd", "a", "b", "c"];
    let paths: Vec<String> = names
        .iter()
        .map(|n| format!("/etc/ksmvm/{n}.toml"))
        .collect();
    for p in &paths {
        items.push(Item::File {
            path: p,
            contents: config.as_bytes(),
        });
    }
    let mut c = Container::start(&rootfs, &items).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("systemd up after {:?}", t0.elapsed());
    let sd = Sd(&c);

    let verify = sd.run(
        "systemd-analyze verify /etc/systemd/system/ksmvm@.service \
         /etc/systemd/system/ksmvm@probe.service /etc/systemd/system/ksmvm-ksm.service 2>&1",
    );
    assert!(
        verify.ok() && verify.stdout.trim().is_empty(),
        "systemd-analyze verify: {verify:?}"
    );
    sd.ok("ksmvm config check /etc/ksmvm/probe.toml");

    type Step = fn(&Sd);
    let steps: [(&str, Step); 7] = [
        ("start waits for the guest", start_waits_for_the_guest),
        ("SIGKILL restarts", sigkill_restarts),
        (
            "stop asks the guest, then times out",
            stop_asks_the_guest_then_times_out,
        ),
        ("silent watchdog restarts", silent_watchdog_restarts),
        ("three instances", three_instances),
        ("a disk and a TAP in the sandbox", devices_in_the_sandbox),
        ("KSM tuning applies", ksm_tuning_applies),
    ];
    for (name, step) in steps {
        let t = Instant::now();
        step(&sd);
        eprintln!("  done: {name} ({:.1} s)", t.elapsed().as_secs_f64());
    }

    let left = sd.run("systemctl list-units --no-legend --state=active 'ksmvm@*'");
    assert!(
        left.stdout.trim().is_empty(),
        "still active: {}",
        left.stdout
    );
    c.teardown().unwrap_or_else(|e| panic!("teardown: {e}"));
    eprintln!("systemd test took {:?}", t0.elapsed());
}

/// `ksmvm config check` validates an instance file without starting
/// anything: exit 0, or exit 2 with FILE:LINE:COLUMN: key: problem. `run`
/// refuses the same file the same way. Needs neither root nor KVM.
#[test]
fn config_check_names_file_line_and_key() {
    let dir = TempDir::new("config-check");
    let ksmvm = ksmvm().display();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        format!("kernel = \"{ksmvm}\"\nmem_mib = 64\nready = \"guest\"\nready_marker = \"UP\"\n"),
    )
    .unwrap();
    let (code, out, err) = run_to_end(&["config", "check", good.to_str().unwrap()], T);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ok (VM good, 64 MiB, 1 vCPU(s))"), "{out}");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, format!("kernel = \"{ksmvm}\"\n\nmem_mib = \"64\"\n")).unwrap();
    let want = format!(
        "{}:3:11: mem_mib: invalid type: string \"64\"",
        bad.display()
    );
    for args in [
        vec!["config", "check", bad.to_str().unwrap()],
        vec!["run", "--config", bad.to_str().unwrap()],
    ] {
        let (code, _, err) = run_to_end(&args, T);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(&want), "{args:?}: {err}");
    }
}

/// `systemd-analyze security` rates the instance unit at most 2.0 (lower
/// is better; 2.6 before the seccomp change), so that a sandboxing
/// directive dropped by mistake shows up here.
#[test]
fn the_instance_units_exposure_stays_at_most_2_0() {
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !require(found, "systemd-analyze (Debian package systemd)") {
        return;
    }
    let unit = repo_root().join("vmm/systemd/ksmvm@.service");
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("ksmvm@.service exposure level {level}");
    assert!(level <= 2.0, "exposure level {level} > 2.0:\n{text}");
}
