//! Helpers for the control API tests: tiny guest kernels built at test
//! time, a private runtime directory per test, ksmvm processes that are
//! killed on drop (so a failing test leaves nothing behind), and raw HTTP.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ksmvm::api::{parse_response, ApiClient, ClientResponse, VmInfo};

pub const KSMVM: &str = env!("CARGO_BIN_EXE_ksmvm");
pub const MEM_MIB: u64 = 80;

/// False (test skipped, with a message) when /dev/kvm cannot be used;
/// with CI=true a missing KVM fails the test instead.
pub fn have_kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("CI=true and this test needs read/write access to /dev/kvm, which is missing");
        }
        eprintln!("SKIPPED: this test needs read/write access to /dev/kvm");
    }
    ok
}

/// Guest images and VMM logs (kept for inspection in the build directory;
/// runtime directories stay under /tmp, as socket paths must be short).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("api-tests-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("cannot create the test scratch directory");
        d
    })
}

/// Assembles and links a freestanding ELF guest (entry at 1 MiB, 64-bit
/// code as the VMM's boot protocol starts it).
fn build_guest(name: &str, asm: &str) -> PathBuf {
    let dir = scratch();
    let src = dir.join(format!("{name}.S"));
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&src, asm).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("gcc").arg("-c").arg(&src).arg("-o").arg(&obj));
    run(Command::new("ld")
        .args(["-static", "-nostdlib", "-Ttext=0x100000", "-e", "_start"])
        .arg(&obj)
        .arg("-o")
        .arg(&elf));
    elf
}

/// Prints `R` on the serial port, then idles forever in `hlt` with
/// interrupts off (the vCPU sleeps in the in-kernel irqchip).
pub fn idle_guest() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        build_guest(
            "idle",
            ".globl _start\n_start:\n mov $0x3f8,%dx\n mov $'R',%al\n out %al,%dx\n1: hlt\n jmp 1b\n",
        )
    })
}

/// Spins a few seconds (CPL0 code is emulated here, ~1 us an instruction;
/// faster on a real VT-x/AMD-V host), then executes `ud2` without an IDT:
/// a triple fault, so the VM ends with an error.
pub fn crashing_guest() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        build_guest(
            "crash",
            ".globl _start\n_start:\n mov $3000000,%ecx\n1: dec %ecx\n jnz 1b\n ud2\n",
        )
    })
}

/// A private KSMVM_RUNTIME_DIR, removed on drop.
pub struct RuntimeDir(pub PathBuf);

impl RuntimeDir {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "ksmvm-api-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        Self(d)
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.sock"))
    }

    /// Runs a ksmvm command against this directory and waits for it.
    pub fn ksmvm(&self, args: &[&str]) -> Output {
        ksmvm_in(&self.0, args)
    }

    /// Like [`RuntimeDir::ksmvm`] but the command must succeed; returns stdout.
    pub fn ksmvm_ok(&self, args: &[&str]) -> String {
        ksmvm_ok_in(&self.0, args)
    }
}

/// Runs a ksmvm command with KSMVM_RUNTIME_DIR=`dir` and waits for it.
pub fn ksmvm_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(KSMVM)
        .args(args)
        .env("KSMVM_RUNTIME_DIR", dir)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run ksmvm")
}

/// Like [`ksmvm_in`] but the command must succeed; returns stdout.
pub fn ksmvm_ok_in(dir: &Path, args: &[&str]) -> String {
    let out = ksmvm_in(dir, args);
    assert!(
        out.status.success(),
        "ksmvm {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("ksmvm printed non-UTF-8")
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Guard {
    pub child: Child,
    pub log: PathBuf,
}

impl Guard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "process {} still running after {timeout:?}; log:\n{}",
                self.pid(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped
        // (we hold the Child), so the pid cannot have been reused.
        unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running VM: `ksmvm run` with its API socket in `dir`.
pub struct Vm {
    pub name: String,
    pub socket: PathBuf,
    pub proc: Guard,
}

impl Vm {
    pub fn start(dir: &RuntimeDir, name: &str) -> Vm {
        Self::start_with(dir, name, idle_guest(), &[])
    }

    pub fn start_with(dir: &RuntimeDir, name: &str, kernel: &Path, extra: &[&str]) -> Vm {
        let mut vm = Self::spawn(dir, name, kernel, extra);
        vm.wait_ready();
        vm
    }

    /// Starts the process without waiting for its API.
    pub fn spawn(dir: &RuntimeDir, name: &str, kernel: &Path, extra: &[&str]) -> Vm {
        let log = scratch().join(format!("{name}-{}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(KSMVM)
            .arg("run")
            .arg("--kernel")
            .arg(kernel)
            .args([
                "--mem-mib",
                &MEM_MIB.to_string(),
                "--name",
                name,
                "--serial",
                "none",
            ])
            .args(extra)
            .env("KSMVM_RUNTIME_DIR", &dir.0)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("cannot start ksmvm");
        let socket = extra
            .iter()
            .position(|a| *a == "--api-sock")
            .and_then(|i| extra.get(i + 1))
            .map_or_else(|| dir.socket(name), PathBuf::from);
        Vm {
            name: name.to_owned(),
            socket,
            proc: Guard { child, log },
        }
    }

    /// Waits until the API answers (the VM is built and running).
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.client().info().is_ok() {
                return;
            }
            if let Ok(Some(st)) = self.proc.child.try_wait() {
                panic!("ksmvm exited early ({st}):\n{}", self.proc.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "API of {} never answered:\n{}",
                self.name,
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> ApiClient {
        ApiClient::new(&self.socket).with_timeout(Duration::from_secs(10))
    }

    pub fn info(&self) -> VmInfo {
        self.client().info().expect("GET /")
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// Sends raw bytes on a new connection and reads the response (the
/// connection is closed after one response).
pub fn raw(socket: &Path, request: &[u8]) -> ClientResponse {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).expect("send");
    read_one_response(&mut s)
}

/// Reads exactly one response (head + Content-Length body).
pub fn read_one_response(s: &mut impl Read) -> ClientResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(r) = parse_response(&buf) {
            let want = r
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if r.body.len() >= want {
                return r;
            }
        }
        let n = s.read(&mut chunk).expect("read response");
        assert!(
            n > 0,
            "connection closed before a full response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub fn request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// The `{"error": ...}` message of an error response (panics if absent).
pub fn error_message(r: &ClientResponse) -> String {
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("error body is JSON");
    v["error"].as_str().expect("error field").to_owned()
}

/// The smaps block (header line first) of the guest RAM mapping of `pid`:
/// the only `mem_mib`-sized private read-write mapping of a VMM whose RAM
/// lies below the 32-bit MMIO gap.
pub fn guest_ram_smaps(pid: u32, mem_mib: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let size = mem_mib << 20;
    let mut blocks: Vec<Vec<String>> = Vec::new();
    let mut in_ram = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let range = words.next().unwrap_or("").split_once('-');
        let perms = words.next().unwrap_or("");
        if let Some((a, b)) = range {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                in_ram = b - a == size && perms == "rw-p";
                if in_ram {
                    blocks.push(Vec::new());
                }
            }
        }
        if in_ram {
            if let Some(b) = blocks.last_mut() {
                b.push(line.to_owned());
            }
        }
    }
    assert_eq!(
        blocks.len(),
        1,
        "expected one {mem_mib} MiB guest RAM mapping in /proc/{pid}/smaps"
    );
    blocks.remove(0)
}

/// The VmFlags of the guest RAM mapping (see [`guest_ram_smaps`]).
pub fn guest_ram_vmflags(pid: u32, mem_mib: u64) -> Vec<String> {
    guest_ram_smaps(pid, mem_mib)
        .iter()
        .find_map(|l| l.strip_prefix("VmFlags:"))
        .expect("VmFlags line")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A `Name:   N kB` field of the guest RAM mapping, in bytes; None if absent.
pub fn guest_ram_field(pid: u32, mem_mib: u64, name: &str) -> Option<u64> {
    guest_ram_smaps(pid, mem_mib).iter().find_map(|l| {
        let v = l.strip_prefix(name)?.strip_prefix(':')?;
        v.trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    })
}
