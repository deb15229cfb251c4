//! The test host: a Linux guest of QEMU's software emulation (TCG) of an AMD
//! CPU with SVM. Its kvm_amd, with nested paging, is a real
//! hardware-virtualisation KVM, so inside it ksmvm boots unmodified Linux to
//! user space even on machines whose own /dev/kvm cannot (see README.md).
//!
//! [`TestHost::run`] boots a fresh test host, runs one command in a chroot
//! of this machine's root (shared read-only over virtio-9p, so the paths
//! inside are the paths outside), streams the command's output, and always
//! stops QEMU: on return, on a panic (drop), on SIGINT/SIGTERM (the caller
//! polls [`interrupted`]) and when the caller dies (PR_SET_PDEATHSIG).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tests/testhost/prepare.sh failed ({status}); its messages are above")]
    Prepare { status: ExitStatus },
    #[error("cannot run {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("the test host image in {dir} lacks {file} (run tests/testhost/prepare.sh)")]
    Image { dir: PathBuf, file: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the test host could not run the command: {0}")]
    Setup(String),
    #[error("interrupted")]
    Interrupted,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// A test that met a documented test-host fault itself (a guest's triple
/// fault at the reset vector before its init, see README.md) writes this
/// file into its artefacts folder (`KSMVM_ARTEFACTS`) before it fails: the
/// suite then runs it once more on a fresh test host.
pub const FAULT_MARKER: &str = "TEST-HOST-FAULT";

/// The test host's kernel and initramfs, as tests/testhost/prepare.sh
/// leaves them.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
}

impl Image {
    /// Runs prepare.sh (a no-op once cached) and returns the image it made.
    pub fn prepare(repo: &Path) -> Result<Image, Error> {
        let script = repo.join("tests/testhost/prepare.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|source| Error::Spawn {
                what: script.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Prepare { status: out.status });
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout.lines().last().unwrap_or_default().trim();
        Image::at(Path::new(dir))
    }

    pub fn at(dir: &Path) -> Result<Image, Error> {
        for file in ["vmlinuz", "initrd.cpio.gz"] {
            if !dir.join(file).is_file() {
                return Err(Error::Image {
                    dir: dir.to_owned(),
                    file,
                });
            }
        }
        Ok(Image {
            dir: dir.to_owned(),
        })
    }
}

/// How to start the test host.
#[derive(Debug, Clone)]
pub struct Config {
    pub qemu: PathBuf,
    pub mem_mib: u32,
    pub smp: u32,
    /// The longest the whole run (boot, command, power-off) may take: past
    /// it the test host is taken as wedged.
    pub timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            qemu: "qemu-system-x86_64".into(),
            mem_mib: 6144,
            smp: 2,
            timeout: Duration::from_secs(900),
        }
    }
}

/// The command to run inside, with its working directory and environment.
#[derive(Debug, Clone)]
pub struct Job {
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Job {
    /// `argv` in the current directory with this process's environment
    /// (less what only makes sense outside).
    pub fn here(argv: Vec<String>) -> Job {
        const DROP: [&str; 5] = ["PWD", "OLDPWD", "SHLVL", "_", "TMPDIR"];
        let env = std::env::vars()
            .filter(|(k, _)| is_shell_name(k) && !DROP.contains(&k.as_str()))
            .collect();
        Job {
            argv,
            cwd: std::env::current_dir().unwrap_or_else(|_| "/".into()),
            env,
        }
    }

    /// The script the test host runs: cd, exports, exec.
    pub fn script(&self) -> String {
        let mut s = format!("cd {} || exit 125\n", quote(&self.cwd.to_string_lossy()));
        for (k, v) in &self.env {
            s.push_str(&format!("export {k}={}\n", quote(v)));
        }
        let argv: Vec<String> = self.argv.iter().map(|a| quote(a)).collect();
        s.push_str(&format!("exec {}\n", argv.join(" ")));
        s
    }
}

fn is_shell_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Single-quotes `s` for sh.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Why a test host did not deliver the command's exit status. Each is a
/// fault of the test host (the emulator or its kernel), not of the command:
/// worth one retry on a fresh test host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// QEMU exited before the command finished (the test host reset or died).
    Died(String),
    /// Nothing finished within the configured timeout (the test host wedged).
    TimedOut(Duration),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Died(how) => write!(f, "the test host died before the command finished ({how})"),
            Fault::TimedOut(t) => {
                write!(f, "the test host did not finish within {} s", t.as_secs())
            }
        }
    }
}

/// What one run gave.
#[derive(Debug)]
pub struct Run {
    /// The command's exit status, or the test host's fault.
    pub result: Result<i32, Fault>,
    /// The test host's console log (its kernel messages).
    pub console: PathBuf,
    /// The scratch folder (cmd.sh, output, rc, and artefacts/ the command
    /// wrote); removed by [`Run::discard`], kept otherwise.
    pub scratch: PathBuf,
    pub elapsed: Duration,
    /// Lines of the console log that point at a test-host problem.
    pub warnings: Vec<String>,
}

impl Run {
    pub fn discard(&self) {
        let _ = fs::remove_dir_all(&self.scratch);
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set [`interrupted`] instead of killing this
/// process, so that a run in progress can stop QEMU and clean up.
pub fn catch_interrupts() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; `signal` has no other preconditions.
        unsafe { libc::signal(sig, handler) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// QEMU, killed and reaped when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Console lines that say the test host itself is in trouble.
const HOST_TROUBLE: [&str; 5] = [
    "soft lockup",
    "rcu_sched self-detected stall",
    "rcu: INFO: rcu_preempt",
    "Kernel panic",
    "hung_task",
];

#[derive(Debug)]
pub struct TestHost;

impl TestHost {
    /// Boots a fresh test host, runs `job` in it and streams the command's
    /// output to `out` as it appears.
    pub fn run(image: &Image, cfg: &Config, job: &Job, out: &mut dyn Write) -> Result<Run, Error> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let scratch = std::env::temp_dir().join(format!(
            "ksmvm-testhost-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(scratch.join("artefacts")).map_err(io_err(&scratch))?;
        let mut job = job.clone();
        job.env.push((
            "KSMVM_ARTEFACTS".into(),
            scratch.join("artefacts").display().to_string(),
        ));
        job.env.push(("KSMVM_TESTHOST".into(), "1".into()));
        let cmd_sh = scratch.join("cmd.sh");
        fs::write(&cmd_sh, job.script()).map_err(io_err(&cmd_sh))?;
        let console = scratch.join("console.log");
        let output = scratch.join("output");

        let start = Instant::now();
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(qemu_args(image, cfg, &scratch, &console))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
        // no memory of the parent; QEMU dies with this process.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            what: cfg.qemu.display().to_string(),
            source,
        })?;
        let mut qemu = Qemu(child);
        let mut streamed = 0u64;
        let status = loop {
            streamed = stream_new(&output, streamed, out);
            if interrupted() {
                drop(qemu);
                let _ = fs::remove_dir_all(&scratch);
                return Err(Error::Interrupted);
            }
            if let Ok(Some(st)) = qemu.0.try_wait() {
                break Some(st);
            }
            if start.elapsed() > cfg.timeout {
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        stream_new(&output, streamed, out);
        let mut qemu_err = String::new();
        if let Some(mut e) = qemu.0.stderr.take() {
            if status.is_some() {
                let _ = e.read_to_string(&mut qemu_err);
            }
        }
        drop(qemu);
        let elapsed = start.elapsed();
        let console_text = fs::read_to_string(&console).unwrap_or_default();
        let warnings = console_text
            .lines()
            .filter(|l| HOST_TROUBLE.iter().any(|t| l.contains(t)))
            .map(str::to_owned)
            .collect();
        if let Ok(err) = fs::read_to_string(scratch.join("error")) {
            return Err(Error::Setup(err.trim().to_owned()));
        }
        let rc = fs::read_to_string(scratch.join("rc"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let result = match (rc, status) {
            (Some(rc), _) => Ok(rc),
            (None, None) => Err(Fault::TimedOut(cfg.timeout)),
            (None, Some(st)) => Err(Fault::Died(format!(
                "QEMU {st}{}",
                qemu_err
                    .lines()
                    .last()
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default()
            ))),
        };
        Ok(Run {
            result,
            console,
            scratch,
            elapsed,
            warnings,
        })
    }
}

fn qemu_args(image: &Image, cfg: &Config, scratch: &Path, console: &Path) -> Vec<String> {
    let s = |x: &str| x.to_string();
    vec![
        s("-nodefaults"),
        s("-no-user-config"),
        s("-M"),
        s("pc"),
        // TCG implements SVM with nested paging; multi-threaded TCG gives
        // each test-host CPU its own host thread.
        s("-accel"),
        s("tcg,thread=multi,tb-size=512"),
        s("-cpu"),
        s("max"),
        s("-smp"),
        cfg.smp.to_string(),
        s("-m"),
        format!("{}M", cfg.mem_mib),
        s("-display"),
        s("none"),
        s("-serial"),
        format!("file:{}", console.display()),
        // A reset of the test host ends QEMU instead of booting it again.
        s("-no-reboot"),
        s("-kernel"),
        image.dir.join("vmlinuz").display().to_string(),
        s("-initrd"),
        image.dir.join("initrd.cpio.gz").display().to_string(),
        s("-append"),
        format!(
            "console=ttyS0 panic=-1 ksmvm_th.scratch={}",
            scratch.display()
        ),
        s("-virtfs"),
        s("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"),
        s("-virtfs"),
        format!(
            "local,path={},mount_tag=scratch,security_model=none,multidevs=remap",
            scratch.display()
        ),
    ]
}

/// Copies what `path` gained past `from` to `out`; returns the new length.
fn stream_new(path: &Path, from: u64, out: &mut dyn Write) -> u64 {
    let Ok(mut f) = fs::File::open(path) else {
        return from;
    };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return from;
    }
    let mut buf = Vec::new();
    let n = f.read_to_end(&mut buf).unwrap_or(0);
    let _ = out.write_all(&buf[..n]);
    let _ = out.flush();
    from + n as u64
}

/// Whether this machine's own CPU has hardware virtualisation (then the
/// real-Linux tests run directly, without a test host).
pub fn host_has_hw_virt() -> bool {
    fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_newlines() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
        let job = Job {
            argv: vec!["printf".into(), "%s\n".into(), "it's".into()],
            cwd: "/x y".into(),
            env: vec![("A".into(), "1\n2".into())],
        };
        let s = job.script();
        assert!(s.starts_with("cd '/x y' || exit 125\n"), "{s}");
        assert!(s.contains("export A='1\n2'\n"), "{s}");
        assert!(s.ends_with("exec 'printf' '%s\n' 'it'\\''s'\n"), "{s}");
        let out = Command::new("sh")
            .arg("-c")
            .arg(s.replace("cd '/x y' || exit 125\n", ""))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's\n");
    }

    #[test]
    fn only_shell_names_are_exported() {
        assert!(is_shell_name("KSMVM_CACHE"));
        assert!(is_shell_name("_x1"));
        assert!(!is_shell_name("1A"));
        assert!(!is_shell_name("A-B"));
        assert!(!is_shell_name(""));
    }

    #[test]
    fn streaming_copies_only_new_bytes() {
        let dir = std::env::temp_dir().join(format!("ksmvm-th-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out");
        fs::write(&p, b"abc").unwrap();
        let mut sink = Vec::new();
        let n = stream_new(&p, 0, &mut sink);
        fs::write(&p, b"abcdef").unwrap();
        let n = stream_new(&p, n, &mut sink);
        assert_eq!((n, sink.as_slice()), (6, &b"abcdef"[..]));
        assert_eq!(stream_new(&dir.join("missing"), 4, &mut sink), 4);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_image_without_its_files_is_named() {
        let err = Image::at(Path::new("/nonexistent-testhost")).unwrap_err();
        assert!(err.to_string().contains("lacks vmlinuz"), "{err}");
    }
}
