//! The Mastodon base image (guest-image/mastodon) under ksmvm: the project's
//! kernel, the shared read-only root, a per-instance data disk, a TAP, the
//! balloon with free page reporting and the rng, exactly as
//! `new-instance.sh` writes the instance file (its command line included).
//! systemd runs in the guest; the instances are made with TEST_CONSOLE=1,
//! so that the image's test console (ksmvm-test-console.service) answers
//! shell lines on the serial console once the ready marker is out.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::linux_guest::*;
use crate::{assert_ksm_status_matches_sysfs, wait_for, MIB};
use ksmvm_testkit::*;

/// systemd, PostgreSQL's first `initdb` and the services in a guest under
/// nested emulation: a few minutes on a loaded 2-core machine.
const MULTI_USER_LIMIT: Duration = Duration::from_secs(900);
/// What the guest's own shutdown may take before ksmvm stops it; the tests
/// assert that it ends well before.
const SHUTDOWN_TIMEOUT_S: u64 = 300;
const SERVICES: &str = "postgresql@15-main redis-server nginx";
/// The guests' network: 10.77.0.1 is the test's end of each TAP.
const HOST_ADDR: &str = "10.77.0.1/24";

fn rootfs() -> PathBuf {
    cache().join("rootfs/root.ext4")
}

fn base_image_ready() -> bool {
    lane_ready(&Kernel::Ksmvm)
        && require(
            rootfs().is_file(),
            &format!(
                "the Mastodon base image {} (`make test-linux` builds it)",
                rootfs().display()
            ),
        )
}

/// One instance made by guest-image/mastodon/new-instance.sh.
struct Instance {
    name: String,
    toml: PathBuf,
    data: PathBuf,
    addr: String,
}

impl Instance {
    fn new(dir: &TempDir, name: &str, n: u8) -> Instance {
        let addr = format!("10.77.0.{}", 10 + n);
        let out = Command::new(repo_root().join("guest-image/mastodon/new-instance.sh"))
            .args([
                name,
                &format!("{name}.test.example"),
                &dir.path().display().to_string(),
            ])
            .env("KERNEL", Kernel::Ksmvm.path())
            .env("ROOTFS", rootfs())
            .env("DATA_SIZE", "1G")
            .env("ADDRESS", format!("{addr}/24"))
            .env("TEST_CONSOLE", "1")
            .output()
            .expect("run new-instance.sh");
        assert!(
            out.status.success(),
            "new-instance.sh {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Instance {
            name: name.to_owned(),
            toml: dir.join(&format!("{name}.toml")),
            data: dir.join(&format!("{name}.data.ext4")),
            addr,
        }
    }

    /// `ksmvm run` with the instance file; the serial console goes to
    /// stdout so that the test reads it.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "--config",
            &self.toml.display().to_string(),
            "--serial",
            "stdout",
            "--log-level",
            "info",
            "--shutdown-timeout-s",
            &SHUTDOWN_TIMEOUT_S.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Boots the instance in `ns` (its TAP must be there) to multi-user and
    /// attaches to its test console. Returns the guest and the marker line.
    fn boot(&self, ns: &NetNs, extra: &[&str]) -> (LinuxGuest, String) {
        let args = self.args(extra);
        let t0 = Instant::now();
        let (vm, marker) = spawn_until_line(&self.name, "KSMVM-READY ", MULTI_USER_LIMIT, || {
            Vmm::spawn_in_netns(ns, &args)
        });
        eprintln!(
            "{}: multi-user in {:.1} s: {}",
            self.name,
            t0.elapsed().as_secs_f64(),
            marker.trim()
        );
        let g = LinuxGuest::attach(&self.name, vm, CMD_LIMIT);
        (g, marker)
    }

    /// A file on the instance's data disk, read from the host image.
    fn read_data_file(&self, path: &str) -> Vec<u8> {
        let out = Command::new("debugfs")
            .args([
                "-R",
                &format!("cat {path}"),
                &self.data.display().to_string(),
            ])
            .output()
            .expect("run debugfs");
        assert!(out.status.success(), "debugfs: {out:?}");
        out.stdout
    }
}

/// The marker says the required services are active.
fn assert_marker_ok(name: &str, marker: &str) {
    assert!(
        marker.contains("KSMVM-READY ok"),
        "{name}: services not up: {marker}"
    );
    for s in SERVICES.split(' ') {
        assert!(marker.contains(&format!("{s}=active")), "{name}: {marker}");
    }
}

/// The services answer, not just run.
fn assert_services_answer(g: &mut LinuxGuest) {
    let out = g.ok(&format!("systemctl is-active {SERVICES}"));
    assert_eq!(
        out.iter().filter(|l| l.trim() == "active").count(),
        3,
        "{out:?}"
    );
    let one: String = g.value("runuser -u postgres -- psql -tAc 'select 1'");
    assert_eq!(one, "1");
    let pong = g.ok("redis-cli ping");
    assert!(pong.iter().any(|l| l.trim() == "PONG"), "{pong:?}");
}

fn md5_of(g: &mut LinuxGuest, path: &str) -> String {
    g.value(&format!("md5sum {path} | cut -d' ' -f1"))
}

fn md5_hex(bytes: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run md5sum");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Everything waiting on the notify socket.
fn notifications(sock: &UnixDatagram) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    got
}

fn has_ready(msgs: &[String]) -> bool {
    msgs.iter().any(|m| m.lines().any(|l| l == "READY=1"))
}

/// SIGTERM to every guest at once; each must end through its own shutdown
/// (Ctrl-Alt-Del → systemd → ACPI power-off), with exit status 0.
fn stop_gracefully(guests: Vec<(String, LinuxGuest)>) -> Duration {
    let t0 = Instant::now();
    for (_, g) in &guests {
        g.vm.terminate();
    }
    for (name, mut g) in guests {
        let (status, stderr) =
            g.vm.wait_keeping(Duration::from_secs(SHUTDOWN_TIMEOUT_S + 60));
        keep_artefact(&format!("{name}.serial.log"), &g.vm.seen.join("\n"));
        assert_eq!(status.code(), Some(0), "{name}: {stderr}");
        assert!(stderr.contains("Ctrl-Alt-Del"), "{name}: {stderr}");
        assert!(
            !stderr.contains("did not shut down"),
            "{name}: the timeout path ended it: {stderr}"
        );
        assert!(stderr.contains("the guest powered off"), "{name}: {stderr}");
    }
    t0.elapsed()
}

/// The base image to multi-user (PostgreSQL, Redis and nginx active and
/// answering; READY=1 only after the guest's marker), nginx reachable over
/// the TAP, then SIGTERM → systemd's shutdown → exit 0 with what the guest
/// wrote on its data disk in the host image.
#[test]
fn mastodon_base_image_multi_user_then_graceful_stop() {
    if !base_image_ready() {
        return;
    }
    let dir = TempDir::new("rl-masto");
    let inst = Instance::new(&dir, "masto0", 0);
    let ns = NetNs::new("rlmasto");
    ns.add_tap(&inst.name);
    ns.ip(&["addr", "add", HOST_ADDR, "dev", &inst.name]);
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();

    let args = inst.args(&[]);
    let t0 = Instant::now();
    let mut vm = Vmm::spawn_in_netns_with_env(&ns, &args, &[("NOTIFY_SOCKET", &sock_path)]);
    // Running, but not up: with ready = "guest" no READY=1 yet.
    let api = vm.api(&inst.name);
    wait_for("the control API", Duration::from_secs(60), || {
        api.stats().is_ok()
    });
    std::thread::sleep(Duration::from_secs(2));
    let early = notifications(&sock);
    assert!(
        !has_ready(&early),
        "READY=1 before the guest's marker: {early:?}"
    );
    let marker = match vm.try_expect_line_containing("KSMVM-READY ", MULTI_USER_LIMIT) {
        Ok(m) => m,
        Err(e) => boot_failed("masto0", "KSMVM-READY ", &mut vm, &format!("{e:?}")),
    };
    eprintln!(
        "masto0: multi-user in {:.1} s: {}",
        t0.elapsed().as_secs_f64(),
        marker.trim()
    );
    assert_marker_ok("masto0", &marker);
    let mut later = Vec::new();
    wait_for("READY=1 after the marker", Duration::from_secs(30), || {
        later.extend(notifications(&sock));
        has_ready(&later)
    });
    assert!(
        later.iter().any(|m| m.contains("STATUS=")),
        "no STATUS= line: {later:?}"
    );

    let mut g = LinuxGuest::attach("masto0", vm, CMD_LIMIT);
    assert_services_answer(&mut g);
    // init_on_free=1 (the instance's command line) zeroes all of RAM at
    // boot; free page reporting must give the free part back.
    let mut last = None;
    wait_for("free page reporting", Duration::from_secs(180), || {
        let (Ok(b), Ok(s)) = (api.balloon(), api.stats()) else {
            return false;
        };
        let done = b.reported_bytes >= 256 * MIB && s.guest_ram.rss <= 768 * MIB;
        last = Some((b.reported_bytes, s.guest_ram.rss));
        done
    });
    if let Some((reported, rss)) = last {
        eprintln!(
            "masto0: free page reporting: {} MiB reported, guest RAM Rss {} of 1024 MiB",
            reported / MIB,
            rss / MIB
        );
    }
    let state = g.ok("systemctl is-system-running; systemctl --failed --no-legend --plain");
    assert_eq!(
        state.first().map(|s| s.trim()),
        Some("running"),
        "{state:?}"
    );
    // The devices, as the image uses them.
    let (rc, out) = g.sh("touch /usr/ksmvm-ro-check");
    assert_ne!(rc, 0, "the shared root is writable: {out:?}");
    assert!(out.iter().any(|l| l.contains("Read-only")), "{out:?}");
    g.ok("findmnt -no SOURCE /data | grep -qx /dev/vdb");
    g.ok("ls /sys/bus/virtio/drivers/virtio_balloon/ | grep -q virtio");
    g.ok("grep -q virtio_rng /sys/class/misc/hw_random/rng_available");
    g.ok("head -c 4096 /dev/hwrng | wc -c | grep -qx 4096");
    g.ok(&format!(
        "ip -4 -o addr show dev eth0 | grep -q 'inet {}/'",
        inst.addr
    ));

    // nginx over the TAP, from the test's side of it.
    let curl = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "curl",
            "-s",
            "-m",
            "30",
            "-o",
            "/dev/null",
            "-D",
            "-",
        ])
        .arg(format!("http://{}/", inst.addr))
        .output()
        .expect("run curl");
    let headers = String::from_utf8_lossy(&curl.stdout);
    assert!(
        headers.starts_with("HTTP/1.1 ") && headers.contains("Server: nginx"),
        "nginx over the TAP: {headers:?} {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    eprintln!(
        "masto0: nginx over the TAP: {}",
        headers.lines().next().unwrap_or_default()
    );

    // Buffered, not synced: only the guest's shutdown puts it on the disk.
    g.ok("head -c 1048576 /dev/urandom >/data/stop-check");
    let sum = md5_of(&mut g, "/data/stop-check");
    let took = stop_gracefully(vec![("masto0".into(), g)]);
    eprintln!(
        "masto0: SIGTERM to exit {:.1} s (systemd's shutdown in the guest)",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(SHUTDOWN_TIMEOUT_S),
        "took {took:?}"
    );
    let on_disk = inst.read_data_file("/stop-check");
    assert_eq!(on_disk.len(), 1 << 20, "the data disk lost the file");
    assert_eq!(md5_hex(&on_disk), sum, "the data disk has other bytes");
}

/// Three guests of the base image under the test host's KSM: merged pages
/// become a large part of each guest's resident memory, every guest stays
/// healthy (services active and answering, a data file's checksum
/// unchanged), and `ksmvm ksm status` agrees with sysfs.
#[test]
fn ksm_merges_three_mastodon_guests() {
    if !base_image_ready() || !have_ksm() {
        return;
    }
    let dir = TempDir::new("rl-mksm");
    let ns = NetNs::new("rlmksm");
    let _lock = ksmvm::ksm::HostLock::acquire().expect("KSM host lock");
    let mut guests = Vec::new();
    let mut sums = Vec::new();
    // One at a time: concurrent boots are where the emulator is least
    // reliable (tests/testhost/README.md).
    for i in 0..3u8 {
        let inst = Instance::new(&dir, &format!("mksm{i}"), i);
        ns.add_tap(&inst.name);
        let (mut g, marker) = inst.boot(&ns, &["--mem-mib", "768"]);
        assert_marker_ok(&inst.name, &marker);
        // Each guest's own data, in its page cache.
        g.ok("head -c 8388608 /dev/urandom >/data/blob && sync");
        sums.push(md5_of(&mut g, "/data/blob"));
        guests.push((inst, g));
    }
    // Scanning starts once all three are up: a busy ksmd on the test
    // host's two emulated CPUs doubles each boot.
    let (ksm, _guard) = fast_ksm();
    let apis: Vec<_> = guests
        .iter()
        .map(|(inst, g)| g.vm.api(&inst.name))
        .collect();
    let share = |a: &ksmvm::api::ApiClient| -> Option<(u64, u64)> {
        let s = a.stats().ok()?;
        Some((s.guest_ram.ksm?, s.guest_ram.rss))
    };
    // Merging has settled when no guest's merged figure grows for a while.
    let mut last: Vec<u64> = vec![0; 3];
    let mut steady_since = Instant::now();
    wait_for("merging to settle", Duration::from_secs(900), || {
        let now: Vec<u64> = apis
            .iter()
            .map(|a| share(a).map(|(m, _)| m).unwrap_or(0))
            .collect();
        if now.iter().zip(&last).any(|(n, l)| *n > *l + 4 * MIB) {
            steady_since = Instant::now();
        }
        last = now;
        last.iter().all(|m| *m > 0) && steady_since.elapsed() > Duration::from_secs(60)
    });
    for ((inst, _), a) in guests.iter().zip(&apis) {
        let s = a.stats().unwrap();
        let merged = s.guest_ram.ksm.unwrap();
        let reported = a.balloon().map(|b| b.reported_bytes).unwrap_or(0);
        eprintln!(
            "{}: resident {} MiB, merged {} MiB ({:.0} %), effective {:?} MiB, free page reports {} MiB",
            inst.name,
            s.guest_ram.rss / MIB,
            merged / MIB,
            s.merged_fraction.unwrap_or(0.0) * 100.0,
            s.effective_bytes.map(|b| b / MIB),
            reported / MIB
        );
        assert!(
            merged * 100 >= s.guest_ram.rss * 30,
            "{}: only {} of {} MiB merged",
            inst.name,
            merged / MIB,
            s.guest_ram.rss / MIB
        );
    }
    for ((inst, g), want) in guests.iter_mut().zip(&sums) {
        assert_services_answer(g);
        // From the page cache (guest RAM the host merged), then from disk.
        assert_eq!(
            &md5_of(g, "/data/blob"),
            want,
            "{}: data changed",
            inst.name
        );
        g.ok("echo 3 >/proc/sys/vm/drop_caches");
        assert_eq!(
            &md5_of(g, "/data/blob"),
            want,
            "{}: data changed",
            inst.name
        );
    }
    assert_ksm_status_matches_sysfs();
    drop(ksm);
    let took = stop_gracefully(guests.into_iter().map(|(inst, g)| (inst.name, g)).collect());
    eprintln!("mksm: three guests stopped in {:.1} s", took.as_secs_f64());
}
