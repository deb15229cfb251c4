//! VMs driven through their control API: tiny guest kernels assembled at
//! test time, [`ApiVm`] (a named VM in a shared runtime directory, serial
//! off), and raw HTTP over the API socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ksmvm::api::{parse_response, ApiClient, ClientResponse, VmInfo};

use crate::dirs::RuntimeDir;
use crate::vmm::{Launch, Vmm};

/// The guest RAM of an [`ApiVm`].
pub const MEM_MIB: u64 = 80;

/// Assembles and links a freestanding ELF guest (entry at 1 MiB, 64-bit
/// code as the VMM's boot protocol starts it) into the kit's scratch
/// directory. Built under a per-process name and renamed into place, so
/// that concurrent test processes never see a half-written guest.
fn build_guest(name: &str, asm: &str) -> PathBuf {
    let dir = crate::paths::scratch_dir().join("guests");
    std::fs::create_dir_all(&dir).expect("create the guest directory");
    let tmp = |ext: &str| dir.join(format!("{name}-{}.{ext}", std::process::id()));
    let (src, obj, elf) = (tmp("S"), tmp("o"), tmp("elf"));
    std::fs::write(&src, asm).expect("write the guest's source");
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
    let done = dir.join(format!("{name}.elf"));
    std::fs::rename(&elf, &done).expect("move the guest into place");
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&obj);
    done
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

/// A running VM seen through its API: `ksmvm run --name NAME --serial none
/// --mem-mib 80` with its socket in a shared runtime directory, started by
/// the kit's launcher (its log is [`Vmm::log_text`]).
#[derive(Debug)]
pub struct ApiVm {
    pub name: String,
    pub socket: PathBuf,
    pub proc: Vmm,
}

impl ApiVm {
    /// The idle guest, waiting for its API.
    pub fn start(dir: &RuntimeDir, name: &str) -> ApiVm {
        Self::start_with(dir, name, idle_guest(), &[])
    }

    /// `kernel` with extra `ksmvm run` flags, waiting for its API.
    pub fn start_with(dir: &RuntimeDir, name: &str, kernel: &Path, extra: &[&str]) -> ApiVm {
        let mut vm = Self::spawn(dir, name, kernel, extra);
        vm.wait_ready();
        vm
    }

    /// Starts the process without waiting for its API.
    pub fn spawn(dir: &RuntimeDir, name: &str, kernel: &Path, extra: &[&str]) -> ApiVm {
        let proc = Launch::new(["run", "--kernel"])
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
            .runtime_dir(dir.path())
            .stdin_closed()
            .start();
        let socket = extra
            .iter()
            .position(|a| *a == "--api-sock")
            .and_then(|i| extra.get(i + 1))
            .map_or_else(|| dir.socket(name), PathBuf::from);
        ApiVm {
            name: name.to_owned(),
            socket,
            proc,
        }
    }

    /// Waits until the API answers (the VM is built and running).
    ///
    /// # Panics
    /// When ksmvm exits first, or the API stays silent for 20 s.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.client().info().is_ok() {
                return;
            }
            if let Some(st) = self.proc.try_status() {
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

    /// `GET /`.
    ///
    /// # Panics
    /// When the API does not answer.
    pub fn info(&self) -> VmInfo {
        self.client().info().expect("GET /")
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// Sends raw bytes on a new connection and reads the response (the
/// connection is closed after one response).
///
/// # Panics
/// On any I/O error.
pub fn raw(socket: &Path, request: &[u8]) -> ClientResponse {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    s.write_all(request).expect("send");
    read_one_response(&mut s)
}

/// Reads exactly one response (head + Content-Length body).
///
/// # Panics
/// On an I/O error or a connection closed early.
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

/// An HTTP/1.1 request with `Connection: close`.
pub fn request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// The `{"error": ...}` message of an error response.
///
/// # Panics
/// When the response is not a JSON error.
pub fn error_message(r: &ClientResponse) -> String {
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("error body is JSON");
    v["error"].as_str().expect("error field").to_owned()
}

/// `GET /stats` as JSON, whatever fields this build of ksmvm has.
///
/// # Errors
/// When the API does not answer 200 with JSON.
pub fn stats_json(client: &ApiClient) -> Result<serde_json::Value, String> {
    let r = client
        .request("GET", "/stats", None)
        .map_err(|e| format!("GET /stats: {e}"))?;
    if r.status != 200 {
        return Err(format!(
            "GET /stats: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        ));
    }
    serde_json::from_slice(&r.body).map_err(|e| format!("GET /stats: {e}"))
}

/// The `counters` object of device `id` in `GET /stats`'s `devices` list
/// (None if the VMM reports no such device, or no per-device counters).
///
/// # Errors
/// As [`stats_json`].
pub fn device_counters(
    client: &ApiClient,
    id: &str,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, String> {
    let stats = stats_json(client)?;
    Ok(stats["devices"].as_array().and_then(|devs| {
        devs.iter()
            .find(|d| d["id"].as_str() == Some(id))
            .and_then(|d| d["counters"].as_object().cloned())
    }))
}

/// One counter of device `id` (see [`device_counters`]).
///
/// # Panics
/// When the API does not answer, or the device or counter is missing,
/// with the whole `GET /stats` body.
pub fn device_counter(client: &ApiClient, id: &str, name: &str) -> u64 {
    let counters = device_counters(client, id).unwrap_or_else(|e| panic!("{e}"));
    counters
        .as_ref()
        .and_then(|c| c.get(name))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| {
            panic!(
                "GET /stats has no counter {name:?} for device {id:?}: {}",
                stats_json(client).map_or_else(|e| e, |v| v.to_string())
            )
        })
}
