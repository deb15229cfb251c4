//! ksmvm-io-bench: virtio block and net throughput, driven by the probe
//! guest, with the CPU time the VMM's device thread spends per GiB moved.
//!
//! ```text
//! ksmvm-io-bench [block|net|all] [--ksmvm PATH] [--probe PATH] [--runs N]
//!                [--disk-mib N] [--blk-mib N] [--image-dir DIR]
//!                [--net-frames N] [--echo-frames N] [--echo-window N]
//!                [--pings N]
//! ```
//!
//! * block: boots the probe with a raw image of `--disk-mib` (512) MiB and
//!   runs `blk-bench 0 <blk-mib>` (256) `--runs` (5) times. Each run writes
//!   then reads `blk-mib` MiB (64 KiB requests, 4 in flight, FLUSH after the
//!   writes). Reported per run: write and read MiB/s from the probe's TSC
//!   cycles and tsc_khz, MiB/s over host wall time around the command (both
//!   phases: 2 x blk-mib moved), and the device thread's CPU time per GiB
//!   moved.
//! * net (root: a network namespace with a TAP device): `net-send 0 N 1514`
//!   (guest -> host; an AF_PACKET socket on the TAP counts the frames), then
//!   `net-echo 0 on` and the host sends 1514-byte frames with a window of
//!   frames in flight, the guest echoes each back (MACs swapped): Mb/s per
//!   direction, and sequential 64-byte ping-pongs for the round-trip time.
//!
//! The device thread is the virtio event loop thread, found by its name
//! (`virtio-devices`, see vmm/src/devices/virtio/event_loop.rs) in
//! /proc/PID/task/*/comm. Its CPU time is utime + stime from
//! /proc/PID/task/TID/stat (clock ticks) and, more precisely, the first
//! field of /proc/PID/task/TID/schedstat (ns on CPU); both are reported.
//!
//! Results: min / median / max over the runs, as Markdown rows for
//! docs/benchmarks.md, and one line per run on stdout starting with `csv,`.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ksmvm::stats::ApproxF64;

/// The name the VMM gives its virtio event loop thread.
const DEVICE_THREAD: &str = "virtio-devices";
const T: Duration = Duration::from_secs(120);
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const MIB: f64 = 1024.0 * 1024.0;
/// The kernel's constants, typed as the fields that take them.
#[allow(clippy::cast_possible_truncation, reason = "ETH_P_ALL is 3")]
const ETH_P_ALL: u16 = libc::ETH_P_ALL as u16;
#[allow(clippy::cast_possible_truncation, reason = "AF_PACKET is 17")]
const AF_PACKET: libc::sa_family_t = libc::AF_PACKET as libc::sa_family_t;

/// `size_of::<T>()` as the length of an option or address passed to the
/// kernel (in a `const`: checked at compile time).
#[allow(clippy::cast_possible_truncation, reason = "asserted to fit")]
const fn socklen<T>() -> libc::socklen_t {
    assert!(std::mem::size_of::<T>() <= libc::socklen_t::MAX as usize);
    std::mem::size_of::<T>() as libc::socklen_t
}

type Result<T> = std::result::Result<T, String>;

struct Opts {
    what: String,
    ksmvm: PathBuf,
    probe: PathBuf,
    runs: usize,
    disk_mib: u64,
    blk_mib: u64,
    image_dir: PathBuf,
    net_frames: u64,
    echo_frames: u64,
    echo_window: usize,
    pings: u64,
    mem_mib: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: ksmvm-io-bench [block|net|all] [--ksmvm PATH] [--probe PATH] [--runs N] \
         [--disk-mib N] [--blk-mib N] [--image-dir DIR] [--net-frames N] [--echo-frames N] \
         [--echo-window N] [--pings N] [--mem-mib N]"
    );
    std::process::exit(2)
}

fn parse_opts() -> Opts {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut o = Opts {
        what: "all".into(),
        ksmvm: root.join("target/release/ksmvm"),
        probe: root.join("guest-image/probe/target/release/probe"),
        runs: 5,
        disk_mib: 512,
        blk_mib: 256,
        image_dir: std::env::temp_dir(),
        net_frames: 200_000,
        echo_frames: 50_000,
        echo_window: 16,
        pings: 2000,
        mem_mib: 256,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<u64>().unwrap_or_else(|_| usage());
        let count = |s: String| s.parse::<usize>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "block" | "net" | "all" => o.what = a,
            "--ksmvm" => o.ksmvm = val().into(),
            "--probe" => o.probe = val().into(),
            "--runs" => o.runs = count(val()).max(1),
            "--disk-mib" => o.disk_mib = num(val()),
            "--blk-mib" => o.blk_mib = num(val()),
            "--image-dir" => o.image_dir = val().into(),
            "--net-frames" => o.net_frames = num(val()),
            "--echo-frames" => o.echo_frames = num(val()),
            "--echo-window" => o.echo_window = count(val()).max(1),
            "--pings" => o.pings = num(val()),
            "--mem-mib" => o.mem_mib = num(val()),
            _ => usage(),
        }
    }
    o
}

/// A running ksmvm with the probe; killed on drop.
struct Vm {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    /// The process whose threads we watch (ksmvm itself, also when started
    /// through `ip netns exec`, which execs it).
    pid: u32,
}

impl Vm {
    fn spawn(mut cmd: Command) -> Result<Vm> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start ksmvm: {e}"))?;
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                let Ok(l) = l else { break };
                if tx.send(l.trim_end_matches('\r').to_string()).is_err() {
                    break;
                }
            }
        });
        let pid = child.id();
        Ok(Vm {
            stdin: child.stdin.take().unwrap(),
            child,
            lines,
            pid,
        })
    }

    fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self
                .lines
                .recv_timeout(left)
                .map_err(|e| format!("waiting for {prefix:?}: {e:?}"))?;
            if l.starts_with("PROBE ERROR") {
                return Err(format!("probe: {l}"));
            }
            if l.starts_with(prefix) {
                return Ok(l);
            }
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("serial input: {e}"))
    }

    fn command(&mut self, line: &str, answer: &str) -> Result<String> {
        self.send(line)?;
        self.expect(answer, T)
    }

    /// The event loop thread's id.
    fn device_thread(&self) -> Result<u32> {
        let dir = format!("/proc/{}/task", self.pid);
        for e in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
            let e = e.map_err(|e| e.to_string())?;
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.trim_end() == DEVICE_THREAD {
                return e
                    .file_name()
                    .to_string_lossy()
                    .parse()
                    .map_err(|_| "bad tid".to_string());
            }
        }
        Err(format!("no thread named {DEVICE_THREAD} in {dir}"))
    }

    fn poweroff(mut self) -> Result<()> {
        self.send("poweroff")?;
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                return if st.success() {
                    Ok(())
                } else {
                    Err(format!("ksmvm exited with {st}"))
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("ksmvm did not power off".into())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU time of one thread so far.
#[derive(Clone, Copy, Debug)]
struct Cpu {
    /// utime + stime, seconds (clock-tick resolution).
    ticks_s: f64,
    /// Time on CPU from schedstat, seconds (ns resolution), if available.
    sched_s: Option<f64>,
}

fn thread_cpu(pid: u32, tid: u32) -> Result<Cpu> {
    let path = format!("/proc/{pid}/task/{tid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the parenthesised comm (which may hold spaces).
    let rest = &stat[stat.rfind(')').ok_or("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = f[11].parse().map_err(|_| "bad utime")?;
    let stime: u64 = f[12].parse().map_err(|_| "bad stime")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.approx_f64();
    let sched_s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(|ns| ns.approx_f64() / 1e9);
    Ok(Cpu {
        ticks_s: (utime + stime).approx_f64() / hz,
        sched_s,
    })
}

fn cpu_delta(a: Cpu, b: Cpu) -> (f64, Option<f64>) {
    (
        b.ticks_s - a.ticks_s,
        a.sched_s.zip(b.sched_s).map(|(x, y)| y - x),
    )
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn num_field(line: &str, key: &str) -> Result<f64> {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no numeric {key}= in {line:?}"))
}

/// (min, median, max).
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (s[0], med, s[n - 1])
}

fn row(name: &str, unit: &str, v: &[f64], prec: usize) {
    let (lo, med, hi) = spread(v);
    println!("| {name} | {med:.prec$} | {lo:.prec$} | {hi:.prec$} | {unit} |");
}

fn header(title: &str, runs: usize) {
    println!();
    println!("{title} ({runs} runs)");
    println!();
    println!("| figure | median | min | max | unit |");
    println!("|---|---:|---:|---:|---|");
}

fn probe_args(o: &Opts, extra: &[String]) -> Vec<String> {
    let mut a = vec![
        "run".to_string(),
        "--kernel".into(),
        o.probe.display().to_string(),
        "--cmdline".into(),
        "console=ttyS0".into(),
        "--mem-mib".into(),
        o.mem_mib.to_string(),
        "--name".into(),
        format!("iobench{}", std::process::id()),
    ];
    a.extend_from_slice(extra);
    a
}

fn runtime_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ksmvm-io-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

// ---------------------------------------------------------------- block

fn block(o: &Opts) -> Result<()> {
    let img = o
        .image_dir
        .join(format!("ksmvm-io-bench-{}.img", std::process::id()));
    let _cleanup = Cleanup(img.clone());
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(o.disk_mib << 20))
        .map_err(|e| format!("{}: {e}", img.display()))?;
    let mut cmd = Command::new(&o.ksmvm);
    cmd.args(probe_args(
        o,
        &["--disk".into(), format!("path={}", img.display())],
    ))
    .env("KSMVM_RUNTIME_DIR", runtime_dir());
    let mut vm = Vm::spawn(cmd)?;
    vm.expect("PROBE READY", T)?;
    let tid = vm.device_thread()?;
    eprintln!(
        "block: {} MiB image {}, blk-bench 0 {} x {}; device thread {tid}",
        o.disk_mib,
        img.display(),
        o.blk_mib,
        o.runs
    );
    let (mut w, mut r, mut wall, mut cpu, mut sched) = (vec![], vec![], vec![], vec![], vec![]);
    let moved = 2.0 * o.blk_mib.approx_f64() * MIB;
    for i in 0..o.runs {
        let c0 = thread_cpu(vm.pid, tid)?;
        let t0 = Instant::now();
        let line = vm.command(&format!("blk-bench 0 {}", o.blk_mib), "PROBE BLK-BENCH")?;
        let secs = t0.elapsed().as_secs_f64();
        let c1 = thread_cpu(vm.pid, tid)?;
        if field(&line, "status") != Some("ok") {
            return Err(format!("blk-bench failed: {line}"));
        }
        let khz = num_field(&line, "tsc_khz")?;
        if khz == 0.0 {
            return Err(format!("the probe could not measure its TSC: {line}"));
        }
        let mib = o.blk_mib.approx_f64();
        let wr = mib / (num_field(&line, "write_cycles")? / (khz * 1e3));
        let rd = mib / (num_field(&line, "read_cycles")? / (khz * 1e3));
        let (dt, ds) = cpu_delta(c0, c1);
        w.push(wr);
        r.push(rd);
        wall.push(moved / MIB / secs);
        cpu.push(dt / (moved / GIB));
        if let Some(ds) = ds {
            sched.push(ds / (moved / GIB));
        }
        println!(
            "csv,block,{i},{wr:.1},{rd:.1},{:.1},{:.4},{:.4}",
            moved / MIB / secs,
            dt / (moved / GIB),
            ds.map_or(f64::NAN, |d| d / (moved / GIB))
        );
    }
    vm.poweroff()?;
    header(
        &format!(
            "Block: blk-bench 0 {} on a {} MiB raw image",
            o.blk_mib, o.disk_mib
        ),
        o.runs,
    );
    row("write (probe TSC, incl. FLUSH)", "MiB/s", &w, 1);
    row("read (probe TSC)", "MiB/s", &r, 1);
    row("write+read (host wall time)", "MiB/s", &wall, 1);
    row("device thread CPU (utime+stime)", "s/GiB", &cpu, 3);
    if !sched.is_empty() {
        row("device thread CPU (schedstat)", "s/GiB", &sched, 3);
    }
    Ok(())
}

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------- net

struct NetNs(String);

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl NetNs {
    fn new(tap: &str) -> Result<NetNs> {
        let ns = NetNs(format!("ksmvm-iobench-{}", std::process::id()));
        ip(&["netns", "add", &ns.0])?;
        ip(&["-n", &ns.0, "tuntap", "add", "dev", tap, "mode", "tap"])?;
        ip(&["-n", &ns.0, "link", "set", tap, "up"])?;
        Ok(ns)
    }

    /// An AF_PACKET socket bound to `ifname` in the namespace.
    fn packet_socket(&self, ifname: &str) -> Result<OwnedFd> {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.0))
            .map_err(|e| format!("netns: {e}"))?;
        let ifname = CString::new(ifname).unwrap();
        // setns changes only the calling thread: enter on a thread of its own.
        std::thread::spawn(move || -> Result<OwnedFd> {
            // SAFETY: setns on this thread with a netns fd we opened;
            // socket/bind/setsockopt get valid arguments, results checked.
            unsafe {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(format!("setns: {}", std::io::Error::last_os_error()));
                }
                let proto = ETH_P_ALL.to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                if fd < 0 {
                    return Err(format!("AF_PACKET: {}", std::io::Error::last_os_error()));
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let size: libc::c_int = 32 << 20;
                for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        opt,
                        std::ptr::addr_of!(size).cast(),
                        const { socklen::<libc::c_int>() },
                    );
                }
                let index = libc::if_nametoindex(ifname.as_ptr());
                if index == 0 {
                    return Err(format!("no interface {ifname:?}"));
                }
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = AF_PACKET;
                sll.sll_protocol = proto;
                sll.sll_ifindex = libc::c_int::try_from(index)
                    .map_err(|_| format!("interface index {index} out of range"))?;
                if libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::addr_of!(sll).cast(),
                    const { socklen::<libc::sockaddr_ll>() },
                ) != 0
                {
                    return Err(format!("bind: {}", std::io::Error::last_os_error()));
                }
                Ok(fd)
            }
        })
        .join()
        .map_err(|_| "netns thread panicked".to_string())?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Receives one frame into `buf` within `ms` (None on timeout).
fn recv(fd: &OwnedFd, buf: &mut [u8], ms: i32) -> Option<usize> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the buffer is valid for its length.
    unsafe {
        if libc::poll(&mut pfd, 1, ms) <= 0 {
            return None;
        }
        let n = libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
        // Negative: an error.
        usize::try_from(n).ok().filter(|n| *n > 0)
    }
}

fn send(fd: &OwnedFd, frame: &[u8]) -> Result<()> {
    // SAFETY: the frame buffer is valid for its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if usize::try_from(n) == Ok(frame.len()) {
        Ok(())
    } else {
        Err(format!("send: {}", std::io::Error::last_os_error()))
    }
}

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn host_frame(seq: u64, size: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(size);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(&seq.to_le_bytes());
    f.resize(size, 0x5a);
    f
}

/// An echo of one of our frames: (sequence number).
fn echo_seq(f: &[u8]) -> Option<u64> {
    (f.len() >= 22 && f[..6] == HOST_MAC && f[6..12] == GUEST_MAC && f[12..14] == ETHERTYPE)
        .then(|| u64::from_le_bytes(f[14..22].try_into().unwrap()))
}

fn net(o: &Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        return Err("net needs root and /dev/net/tun (it makes a netns with a TAP)".into());
    }
    let tap = "iotap0";
    let ns = NetNs::new(tap)?;
    let sock = Arc::new(ns.packet_socket(tap)?);
    let mac = GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    // A 2 MiB disk too: `blk-bench 0 1` is how the probe tells its TSC rate.
    let img = o
        .image_dir
        .join(format!("ksmvm-io-bench-tsc-{}.img", std::process::id()));
    let _cleanup = Cleanup(img.clone());
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(2 << 20))
        .map_err(|e| format!("{}: {e}", img.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0])
        .arg(&o.ksmvm)
        .args(probe_args(
            o,
            &[
                "--net".into(),
                format!("tap={tap},mac={mac}"),
                "--disk".into(),
                format!("path={}", img.display()),
            ],
        ))
        .env("KSMVM_RUNTIME_DIR", runtime_dir());
    let mut vm = Vm::spawn(cmd)?;
    vm.expect("PROBE READY", T)?;
    let tid = vm.device_thread()?;
    let khz = tsc_khz(&mut vm)?;
    eprintln!("net: TAP {tap} in netns {}; device thread {tid}", ns.0);

    // Guest -> host: the host counts what arrives on the TAP.
    const SIZE: u16 = 1514;
    let (mut tx_mbps, mut tx_wall, mut tx_cpu, mut tx_sched, mut tx_seen) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..o.runs {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let counter = {
            let (sock, stop, seen) = (sock.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut b = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Some(n) = recv(&sock, &mut b, 50) {
                        if n == usize::from(SIZE) && b[6..12] == GUEST_MAC && b[12..14] == ETHERTYPE
                        {
                            seen.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let c0 = thread_cpu(vm.pid, tid)?;
        let t0 = Instant::now();
        let line = vm.command(
            &format!("net-send 0 {} {SIZE}", o.net_frames),
            "PROBE NET-SEND",
        )?;
        let secs = t0.elapsed().as_secs_f64();
        let c1 = thread_cpu(vm.pid, tid)?;
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        counter.join().unwrap();
        let sent = num_field(&line, "sent")?;
        let cycles = num_field(&line, "cycles")?;
        let bytes = sent * f64::from(SIZE);
        let (dt, ds) = cpu_delta(c0, c1);
        let mbps = bytes * 8.0 / (cycles / (khz * 1e3)) / 1e6;
        tx_mbps.push(mbps);
        tx_wall.push(bytes * 8.0 / secs / 1e6);
        tx_cpu.push(dt / (bytes / GIB));
        if let Some(ds) = ds {
            tx_sched.push(ds / (bytes / GIB));
        }
        let got = seen.load(Ordering::Relaxed).approx_f64();
        tx_seen.push(100.0 * got / sent);
        println!(
            "csv,net-send,{i},{mbps:.0},{:.0},{:.4},{:.4},{got}",
            bytes * 8.0 / secs / 1e6,
            dt / (bytes / GIB),
            ds.map_or(f64::NAN, |d| d / (bytes / GIB))
        );
    }

    // Host -> guest -> host: echo with a window of frames in flight.
    vm.command("net-echo 0 on", "PROBE NET-ECHO")?;
    let (mut e_mbps, mut e_cpu, mut e_sched, mut e_lost) = (vec![], vec![], vec![], vec![]);
    for i in 0..o.runs {
        let c0 = thread_cpu(vm.pid, tid)?;
        let t0 = Instant::now();
        let (got, lost) = echo_stream(&sock, o.echo_frames, o.echo_window, usize::from(SIZE));
        let secs = t0.elapsed().as_secs_f64();
        let c1 = thread_cpu(vm.pid, tid)?;
        let (dt, ds) = cpu_delta(c0, c1);
        // Bytes the device moved: each echoed frame went in and came out.
        let moved = 2.0 * got.approx_f64() * f64::from(SIZE);
        let mbps = got.approx_f64() * f64::from(SIZE) * 8.0 / secs / 1e6;
        e_mbps.push(mbps);
        e_cpu.push(dt / (moved / GIB));
        if let Some(ds) = ds {
            e_sched.push(ds / (moved / GIB));
        }
        e_lost.push(lost.approx_f64());
        println!(
            "csv,net-echo,{i},{mbps:.0},{:.4},{:.4},{got},{lost}",
            dt / (moved / GIB),
            ds.map_or(f64::NAN, |d| d / (moved / GIB))
        );
    }
    // Round trips, one 64-byte frame at a time.
    let mut rtt_med = vec![];
    let mut rtt_p99 = vec![];
    for _ in 0..o.runs {
        let mut v = ping_pong(&sock, o.pings)?;
        v.sort_by(|a, b| a.total_cmp(b));
        rtt_med.push(v[v.len() / 2]);
        rtt_p99.push(v[v.len() * 99 / 100]);
    }
    vm.command("net-echo 0 off", "PROBE NET-ECHO")?;
    let recv_line = vm.command("net-recv 0", "PROBE NET-RECV")?;
    eprintln!("net: {recv_line}");
    vm.poweroff()?;

    header(
        &format!("Net, guest -> host: net-send 0 {} {SIZE}", o.net_frames),
        o.runs,
    );
    row("throughput (probe TSC)", "Mb/s", &tx_mbps, 0);
    row("throughput (host wall time)", "Mb/s", &tx_wall, 0);
    row("frames seen on the TAP", "%", &tx_seen, 1);
    row("device thread CPU (utime+stime)", "s/GiB", &tx_cpu, 3);
    if !tx_sched.is_empty() {
        row("device thread CPU (schedstat)", "s/GiB", &tx_sched, 3);
    }
    header(
        &format!(
            "Net, host -> guest -> host: net-echo, {} frames of {SIZE} bytes, window {}",
            o.echo_frames, o.echo_window
        ),
        o.runs,
    );
    row("echoed throughput (each way)", "Mb/s", &e_mbps, 0);
    row("frames lost (resent after 200 ms)", "frames", &e_lost, 0);
    row("device thread CPU (utime+stime)", "s/GiB", &e_cpu, 3);
    if !e_sched.is_empty() {
        row("device thread CPU (schedstat)", "s/GiB", &e_sched, 3);
    }
    header(
        &format!("Net, round trip: {} sequential 64-byte echoes", o.pings),
        o.runs,
    );
    row("median round trip", "us", &rtt_med, 0);
    row("99th percentile round trip", "us", &rtt_p99, 0);
    Ok(())
}

/// The guest's TSC rate, as the probe measured it at boot (it prints it
/// only in `blk-bench`, hence the small disk the net VM gets too).
fn tsc_khz(vm: &mut Vm) -> Result<f64> {
    let line = vm.command("blk-bench 0 1", "PROBE BLK-BENCH")?;
    let khz = num_field(&line, "tsc_khz")?;
    if khz == 0.0 {
        return Err(format!("the probe could not measure its TSC: {line}"));
    }
    Ok(khz)
}

/// Sends `count` frames keeping `window` in flight; returns (echoes
/// received, frames resent after a timeout).
fn echo_stream(sock: &OwnedFd, count: u64, window: usize, size: usize) -> (u64, u64) {
    let mut buf = vec![0u8; 65536];
    let mut next = 0u64;
    let mut done = 0u64;
    let mut lost = 0u64;
    let mut in_flight = std::collections::BTreeSet::new();
    while done < count {
        while in_flight.len() < window && next < count {
            if send(sock, &host_frame(next, size)).is_err() {
                break;
            }
            in_flight.insert(next);
            next += 1;
        }
        match recv(sock, &mut buf, 200) {
            Some(n) => {
                if let Some(seq) = echo_seq(&buf[..n]) {
                    if in_flight.remove(&seq) {
                        done += 1;
                    }
                }
            }
            None => {
                // Timed out: the guest dropped them (no buffer); send again.
                for &seq in in_flight.iter() {
                    let _ = send(sock, &host_frame(seq, size));
                    lost += 1;
                }
            }
        }
    }
    (done, lost)
}

/// Round-trip times in microseconds of `n` sequential 64-byte echoes.
fn ping_pong(sock: &OwnedFd, n: u64) -> Result<Vec<f64>> {
    let mut buf = vec![0u8; 65536];
    // A capacity hint only.
    let mut v = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    let base = 1u64 << 40;
    for i in 0..n {
        let seq = base + i;
        let t0 = Instant::now();
        send(sock, &host_frame(seq, 64))?;
        loop {
            let left = 2000 - t0.elapsed().as_millis().min(2000) as i32;
            let Some(k) = recv(sock, &mut buf, left) else {
                return Err(format!("echo {i} did not come back within 2 s"));
            };
            if echo_seq(&buf[..k]) == Some(seq) {
                break;
            }
        }
        v.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    Ok(v)
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs ({model}), Linux {}", kernel.trim())
}

fn main() {
    let o = parse_opts();
    for (what, p) in [("ksmvm", &o.ksmvm), ("probe", &o.probe)] {
        if !p.exists() {
            eprintln!(
                "{what} not found at {} (make build, or --{what} PATH)",
                p.display()
            );
            std::process::exit(2);
        }
    }
    println!("machine: {}", machine());
    let mut failed = false;
    if o.what == "block" || o.what == "all" {
        if let Err(e) = block(&o) {
            eprintln!("block: {e}");
            failed = true;
        }
    }
    if o.what == "net" || o.what == "all" {
        if let Err(e) = net(&o) {
            eprintln!("net: {e}");
            failed = true;
        }
    }
    let _ = std::fs::remove_dir_all(runtime_dir());
    std::process::exit(i32::from(failed));
}
