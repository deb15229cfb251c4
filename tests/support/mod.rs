//! Helpers for the end-to-end tests: they run the real `ksmvm` binary
//! against /dev/kvm with the project's probe guest (or a real Linux kernel).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const KSMVM: &str = env!("CARGO_BIN_EXE_ksmvm");

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns false (and says why) when a requirement is missing outside CI;
/// in CI a missing requirement fails the test instead.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("CI=true and this test needs {what}, which is missing on this machine");
    }
    eprintln!("SKIPPED: this test needs {what}");
    false
}

/// Whether this host's CPU has hardware virtualisation (vmx or svm), as
/// real hosts and the test host (tests/testhost) do.
pub fn hardware_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
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

pub fn have_kvm() -> bool {
    require(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "read/write access to /dev/kvm",
    )
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn have_ksm() -> bool {
    require(
        is_root() && Path::new("/sys/kernel/mm/ksm/run").exists(),
        "root and KSM (/sys/kernel/mm/ksm)",
    )
}

/// Builds the probe guest once per test process (cargo serialises
/// concurrent builds of the same target directory itself).
pub fn probe() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let dir = repo_root().join("guest-image/probe");
            let status = Command::new("cargo")
                .args(["build", "--release", "--quiet"])
                .current_dir(&dir)
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("CARGO_BUILD_TARGET")
                .status()
                .expect("cannot run cargo to build the probe guest");
            assert!(status.success(), "building the probe guest failed");
            dir.join("target/release/probe")
        })
        .clone()
}

/// A running ksmvm process; killed on drop so a failing test leaves nothing behind.
pub struct Vmm {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Receiver<String>,
    /// Every serial line seen so far.
    pub seen: Vec<String>,
    /// Its private KSMVM_RUNTIME_DIR (API socket), see [`runtime_dir`].
    pub runtime: TempDir,
}

/// A private runtime directory for one ksmvm process, so that its API
/// socket (NAME.sock, default name "vm") never meets another test's VM or
/// the host's /run/ksmvm.
pub fn runtime_dir() -> TempDir {
    TempDir::new("run")
}

impl Vmm {
    pub fn spawn<I, S>(args: I) -> Vmm
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Vmm::spawn_program(KSMVM, args, &[])
    }

    fn spawn_program<I, S>(program: &str, args: I, env: &[(&str, &Path)]) -> Vmm
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let runtime = runtime_dir();
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("KSMVM_RUNTIME_DIR", &runtime.0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start ksmvm");
        let lines = pipe_lines(child.stdout.take().expect("stdout"));
        let stderr = pipe_lines(child.stderr.take().expect("stderr"));
        Vmm {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            seen: Vec::new(),
            runtime,
        }
    }

    /// A client for this VM's control API (the VM is named `name`).
    pub fn api(&self, name: &str) -> ksmvm::api::ApiClient {
        ksmvm::api::ApiClient::new(self.runtime.path(&format!("{name}.sock")))
    }

    /// Sends a serial command and returns the probe's answer line.
    pub fn command(&mut self, cmd: &str, answer: &str) -> String {
        self.send(cmd);
        self.expect_line(answer, Duration::from_secs(60))
    }

    /// Runs ksmvm inside a network namespace (for TAP devices that live there).
    pub fn spawn_in_netns(ns: &NetNs, args: &[String]) -> Vmm {
        Vmm::spawn_in_netns_with_env(ns, args, &[])
    }

    /// Like [`spawn_in_netns`](Self::spawn_in_netns), with extra
    /// environment (e.g. NOTIFY_SOCKET).
    pub fn spawn_in_netns_with_env(ns: &NetNs, args: &[String], env: &[(&str, &Path)]) -> Vmm {
        let mut full: Vec<String> =
            vec!["netns".into(), "exec".into(), ns.name.clone(), KSMVM.into()];
        full.extend(args.iter().cloned());
        Vmm::spawn_program("ip", full, env)
    }

    /// Boots the probe with the given extra command line and VMM flags.
    pub fn probe(cmdline: &str, extra: &[&str]) -> Vmm {
        Vmm::spawn(probe_args(cmdline, extra))
    }
}

/// `ksmvm run` arguments that boot the probe.
pub fn probe_args(cmdline: &str, extra: &[&str]) -> Vec<String> {
    {
        let probe = probe();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            probe.display().to_string(),
            "--cmdline".into(),
            format!("console=ttyS0 {cmdline}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }
}

impl Vmm {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a serial line starting with `prefix` and returns it.
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with("PROBE ERROR") && !prefix.starts_with("PROBE ERROR") {
                        panic!("probe reported an error: {l}\nserial so far: {:#?}", self.seen);
                    }
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no serial line starting with {prefix:?} within {timeout:?}; serial: {:#?}\nstderr: {}",
                    self.seen,
                    self.stderr_text()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "ksmvm closed its output before {prefix:?}; status {:?}; serial: {:#?}\nstderr: {}",
                    self.child.try_wait(),
                    self.seen,
                    self.stderr_text()
                ),
            }
        }
    }

    /// Waits for a serial line containing `needle` (kernel logs carry a
    /// timestamp prefix) and returns it.
    pub fn expect_line_containing(&mut self, needle: &str, timeout: Duration) -> String {
        match self.try_expect_line_containing(needle, timeout) {
            Ok(l) => l,
            Err(e) => panic!(
                "no serial line containing {needle:?} ({e:?}); serial: {:#?}\nstderr: {}",
                self.seen,
                self.stderr_text()
            ),
        }
    }

    /// Like [`Vmm::expect_line_containing`], telling a timeout from an
    /// ended VMM instead of panicking.
    pub fn try_expect_line_containing(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.lines.recv_timeout(left)?;
            self.seen.push(l.clone());
            if l.contains(needle) {
                return Ok(l);
            }
        }
    }

    /// Collects serial lines until one starts with `last`, inclusive.
    pub fn lines_until(&mut self, last: &str, timeout: Duration) -> Vec<String> {
        let start = self.seen.len();
        self.expect_line(last, timeout);
        self.seen[start..].to_vec()
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .expect("cannot write to the guest's serial input");
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    /// Waits for the VMM to exit; returns its status and everything it wrote to stderr.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        self.wait_keeping(timeout)
    }

    /// Like `wait`, keeping the handle (for `seen`).
    pub fn wait_keeping(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait for ksmvm") {
                // The reader threads end with the process; drain what is left.
                std::thread::sleep(Duration::from_millis(50));
                for l in self.lines.try_iter() {
                    self.seen.push(l);
                }
                return (st, self.stderr_text());
            }
            if Instant::now() > deadline {
                panic!(
                    "ksmvm did not exit within {timeout:?}; serial: {:#?}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the probe to power off and checks that the VMM exits cleanly.
    pub fn poweroff(mut self) {
        self.send("poweroff");
        let (status, stderr) = self.wait(Duration::from_secs(60));
        assert!(status.success(), "ksmvm exit {status:?}: {stderr}");
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn pipe_lines<R: std::io::Read + Send + 'static>(r: R) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs ksmvm to completion with the given args and stdin closed; returns
/// (exit code, stdout, stderr).
pub fn run_to_end(args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let mut vm = Vmm::spawn(args);
    vm.stdin = None;
    let (status, stderr) = vm.wait_keeping(timeout);
    (status.code(), vm.seen.join("\n"), stderr)
}

/// A private temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("ksmvm-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Parses `key=value` fields of a probe line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

pub fn hex_field(line: &str, key: &str) -> u64 {
    let v = field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    u64::from_str_radix(v.trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("{key}={v} is not hex in {line:?}"))
}

/// A network namespace made for one test, deleted (with its TAPs) on drop.
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip(8)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("ksmvm-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        NetNs { name }
    }

    /// Runs `ip -n NAME ARGS...` in the namespace, asserting success.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Creates a TAP device in the namespace and brings it up.
    pub fn add_tap(&self, tap: &str) {
        self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        self.ip(&["link", "set", tap, "up"]);
    }

    /// A raw AF_PACKET socket bound to `ifname` inside the namespace: it
    /// sees every frame the guest sends and injects frames towards it.
    pub fn packet_socket(&self, ifname: &str) -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name)).expect("open netns");
        let ifname = std::ffi::CString::new(ifname).unwrap();
        // setns(CLONE_NEWNET) changes only the calling thread, so enter the
        // namespace on a thread of its own; the socket stays bound there.
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only, with a netns fd we opened;
            // socket/bind get valid arguments and every result is checked.
            unsafe {
                assert_eq!(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET), 0, "setns");
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                assert!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                let index = libc::if_nametoindex(ifname.as_ptr());
                assert_ne!(index, 0, "no interface {ifname:?}");
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = index as i32;
                let rc = libc::bind(
                    fd,
                    std::ptr::addr_of!(sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                std::os::fd::OwnedFd::from_raw_fd(fd)
            }
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Receives one frame within `timeout` (None on timeout).
pub fn recv_frame(fd: &std::os::fd::OwnedFd, timeout: Duration) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    if n <= 0 {
        return None;
    }
    let mut buf = vec![0u8; 65536];
    // SAFETY: the buffer is valid for its whole length.
    let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    (got > 0).then(|| {
        buf.truncate(got as usize);
        buf
    })
}

pub fn send_frame(fd: &std::os::fd::OwnedFd, frame: &[u8]) {
    use std::os::fd::AsRawFd;
    // SAFETY: the frame buffer is valid for its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        n as usize,
        frame.len(),
        "send: {}",
        std::io::Error::last_os_error()
    );
}

/// Writes `pack` (a `KSMVMRAM` memory image with known content) to `path`.
pub fn write_pack(path: &Path, pack: &probe_pattern::pack::SyntheticPack) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create pack"));
    pack.write(|bytes| out.write_all(bytes).expect("write pack"));
    out.flush().expect("write pack");
}

/// A field of /proc/PID/ksm_stat, read from outside the VMM.
pub fn proc_ksm_stat(pid: u32, key: &str) -> i64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ksm_stat: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/ksm_stat: {text}"))
}

/// Saves every KSM knob and starts ksmd scanning fast enough to converge
/// in seconds (MACHINE.md); the guard restores the knobs, also on panic.
/// Callers hold the KSM host lock.
pub fn fast_ksm() -> (ksmvm::ksm::Ksm, ksmvm::ksm::KsmSettingsGuard) {
    let ksm = ksmvm::ksm::Ksm::new();
    let guard = ksm.settings_guard().expect("save KSM settings");
    ksm.tune(&ksmvm::ksm::KsmTuning {
        pages_to_scan: Some(20_000),
        sleep_millisecs: Some(20),
        enabled: Some(true),
        ..Default::default()
    })
    .expect("tune KSM");
    (ksm, guard)
}
