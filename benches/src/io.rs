//! `ksmvm-bench io`: virtio block and net throughput, driven by the probe
//! guest, with the CPU time the VMM's device thread spends per GiB moved.
//!
//! ```text
//! ksmvm-bench io [block|net|all] [--ksmvm PATH] [--probe PATH] [--runs N]
//!                [--disk-mib N] [--blk-mib N] [--image-dir DIR]
//!                [--net-frames N] [--echo-frames N] [--echo-window N]
//!                [--pings N] [--mem-mib N]
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
//! Rate limits are off (`bw=0,iops=0`, `bw=0,pps=0`): this measures the
//! device path. The guests are started by the test kit's launcher (stderr
//! shown as it comes). The device thread is the virtio event loop thread
//! plus, for block, the disk's I/O thread, found by their names
//! (`virtio-devices`, `virtio-blk-io`, see vmm/src/threads.rs) in
//! /proc/PID/task/*/comm. Its CPU time is utime + stime from
//! /proc/PID/task/TID/stat (clock ticks) and, more precisely, the first
//! field of /proc/PID/task/TID/schedstat (ns on CPU); both are reported.
//!
//! Results: min / median / max over the runs, as Markdown rows for
//! docs/benchmarks.md, and one line per run on stdout starting with `csv,`.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use ksmvm::stats::ApproxF64;
use ksmvm_testkit::net::{force_socket_buffers, recv_frame_into, try_send_frame};
use ksmvm_testkit::proc::{thread_by_name, ThreadCpu};
use ksmvm_testkit::{is_root, parse_field, Launch, NetNs, RuntimeDir, Vmm};

/// The name the VMM gives its virtio event loop thread.
const DEVICE_THREAD: &str = "virtio-devices";
/// A disk's I/O thread (vmm/src/devices/virtio/block/io.rs).
const BLOCK_IO_THREAD: &str = "virtio-blk-io";
/// Limits off: the benchmark measures the device path, not the limiter.
const UNLIMITED: &str = "bw=0,iops=0";
const T: Duration = Duration::from_secs(120);
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
const MIB: f64 = 1024.0 * 1024.0;
/// The AF_PACKET socket's buffers: room for a window of full frames.
const SOCKET_BUFFERS: libc::c_int = 32 << 20;

/// Which devices to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum What {
    Block,
    Net,
    All,
}

#[derive(Args, Debug, Clone)]
pub struct IoArgs {
    /// What to measure.
    #[arg(value_enum, default_value = "all")]
    pub what: What,
    /// The ksmvm binary (default: the repository's target/release/ksmvm).
    #[arg(long)]
    pub ksmvm: Option<PathBuf>,
    /// The probe guest (default: the repository's guest-image/probe build).
    #[arg(long)]
    pub probe: Option<PathBuf>,
    /// Runs per figure (at least 1).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Size of the block benchmark's raw image, MiB.
    #[arg(long, default_value_t = 512)]
    pub disk_mib: u64,
    /// MiB written then read per `blk-bench` run.
    #[arg(long, default_value_t = 256)]
    pub blk_mib: u64,
    /// Where the disk images are made (default: the temporary directory).
    #[arg(long)]
    pub image_dir: Option<PathBuf>,
    /// Frames per `net-send` run.
    #[arg(long, default_value_t = 200_000)]
    pub net_frames: u64,
    /// Frames per echo run.
    #[arg(long, default_value_t = 50_000)]
    pub echo_frames: u64,
    /// Echo frames in flight (at least 1).
    #[arg(long, default_value_t = 16)]
    pub echo_window: usize,
    /// Sequential 64-byte round trips per run.
    #[arg(long, default_value_t = 2000)]
    pub pings: u64,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
}

/// The options with their defaults filled in.
struct Opts {
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
    /// The guests' KSMVM_RUNTIME_DIR.
    runtime: RuntimeDir,
}

impl Opts {
    fn new(a: &IoArgs) -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Ok(Self {
            ksmvm: a
                .ksmvm
                .clone()
                .unwrap_or_else(|| root.join("target/release/ksmvm")),
            probe: a
                .probe
                .clone()
                .unwrap_or_else(|| root.join("guest-image/probe/target/release/probe")),
            runs: a.runs.max(1),
            disk_mib: a.disk_mib,
            blk_mib: a.blk_mib,
            image_dir: a.image_dir.clone().unwrap_or_else(std::env::temp_dir),
            net_frames: a.net_frames,
            echo_frames: a.echo_frames,
            echo_window: a.echo_window.max(1),
            pings: a.pings,
            mem_mib: a.mem_mib,
            runtime: RuntimeDir::create("bench-io")?,
        })
    }

    /// The probe guest with `extra` flags, by the kit's launcher.
    fn launch(&self, extra: &[String]) -> Launch {
        Launch::program(&self.ksmvm)
            .args([
                "run".to_string(),
                "--kernel".into(),
                self.probe.display().to_string(),
                "--cmdline".into(),
                "console=ttyS0".into(),
                "--mem-mib".into(),
                self.mem_mib.to_string(),
                "--name".into(),
                format!("iobench{}", std::process::id()),
            ])
            .args(extra)
            .runtime_dir(self.runtime.path())
            .echo_stderr()
    }
}

/// A running probe: the kit's [`Vmm`], with anyhow errors.
struct Vm {
    vmm: Vmm,
}

impl Vm {
    fn spawn(launch: Launch) -> Result<Vm> {
        let vmm = launch.spawn().context("cannot start ksmvm")?;
        Ok(Vm { vmm })
    }

    /// The process whose threads we watch (ksmvm itself, also when started
    /// through `ip netns exec`, which execs it).
    fn pid(&self) -> u32 {
        self.vmm.pid()
    }

    fn expect(&mut self, prefix: &str, timeout: Duration) -> Result<String> {
        self.vmm
            .try_expect(prefix, timeout)
            .map(|l| l.text)
            .map_err(|e| anyhow!("waiting for {prefix:?}: {e}{}", self.vmm.context()))
    }

    fn command(&mut self, line: &str, answer: &str) -> Result<String> {
        self.vmm.try_send(line).context("serial input")?;
        self.expect(answer, T)
    }

    /// The event loop thread's id.
    fn device_thread(&self) -> Result<u32> {
        Ok(thread_by_name(self.pid(), DEVICE_THREAD)?)
    }

    fn cpu(&self, tid: u32) -> Result<ThreadCpu> {
        Ok(ThreadCpu::read(self.pid(), tid)?)
    }

    fn poweroff(mut self) -> Result<()> {
        self.vmm.try_send("poweroff").context("serial input")?;
        match self.vmm.try_wait_exit(T) {
            Some(st) if st.success() => Ok(()),
            Some(st) => bail!("ksmvm exited with {st}"),
            None => bail!("ksmvm did not power off"),
        }
    }
}

fn num_field(line: &str, key: &str) -> Result<f64> {
    parse_field(line, key).ok_or_else(|| anyhow!("no numeric {key}= in {line:?}"))
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

/// The device thread's CPU per GiB: clock ticks, and schedstat if the
/// kernel has it.
fn cpu_rows(ticks: &[f64], sched: &[f64]) {
    row("device thread CPU (utime+stime)", "s/GiB", ticks, 3);
    if !sched.is_empty() {
        row("device thread CPU (schedstat)", "s/GiB", sched, 3);
    }
}

fn header(title: &str, runs: usize) {
    println!();
    println!("{title} ({runs} runs)");
    println!();
    println!("| figure | median | min | max | unit |");
    println!("|---|---:|---:|---:|---|");
}

// ---------------------------------------------------------------- block

fn block(o: &Opts) -> Result<()> {
    let img = o
        .image_dir
        .join(format!("ksmvm-bench-io-{}.img", std::process::id()));
    let _cleanup = Cleanup(img.clone());
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(o.disk_mib << 20))
        .with_context(|| img.display().to_string())?;
    let disk = format!("path={},{UNLIMITED}", img.display());
    let mut vm = Vm::spawn(o.launch(&["--disk".into(), disk]))?;
    vm.expect("PROBE READY", T)?;
    let tid = vm.device_thread()?;
    let io_tid = thread_by_name(vm.pid(), BLOCK_IO_THREAD)?;
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
        let (c0, io0) = (vm.cpu(tid)?, vm.cpu(io_tid)?);
        let t0 = Instant::now();
        let line = vm.command(&format!("blk-bench 0 {}", o.blk_mib), "PROBE BLK-BENCH")?;
        let secs = t0.elapsed().as_secs_f64();
        let (c1, io1) = (vm.cpu(tid)?, vm.cpu(io_tid)?);
        if ksmvm_testkit::field(&line, "status") != Some("ok") {
            bail!("blk-bench failed: {line}");
        }
        let khz = num_field(&line, "tsc_khz")?;
        if khz == 0.0 {
            bail!("the probe could not measure its TSC: {line}");
        }
        let mib = o.blk_mib.approx_f64();
        let wr = mib / (num_field(&line, "write_cycles")? / (khz * 1e3));
        let rd = mib / (num_field(&line, "read_cycles")? / (khz * 1e3));
        // The device loop parses, the I/O thread copies: both are the device.
        let (dt0, ds0) = c0.until(c1);
        let (dt1, ds1) = io0.until(io1);
        let (dt, ds) = (dt0 + dt1, ds0.zip(ds1).map(|(a, b)| a + b));
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
    cpu_rows(&cpu, &sched);
    Ok(())
}

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------- net

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
    if !is_root() || !Path::new("/dev/net/tun").exists() {
        bail!("net needs root and /dev/net/tun (it makes a netns with a TAP)");
    }
    let tap = "iotap0";
    let ns = NetNs::create("iobench")?;
    ns.try_add_tap(tap)?;
    let sock = ns.try_packet_socket(tap)?;
    force_socket_buffers(&sock, SOCKET_BUFFERS);
    let sock = Arc::new(sock);
    let mac = GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    // A 2 MiB disk too: `blk-bench 0 1` is how the probe tells its TSC rate.
    let img = o
        .image_dir
        .join(format!("ksmvm-bench-io-tsc-{}.img", std::process::id()));
    let _cleanup = Cleanup(img.clone());
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(2 << 20))
        .with_context(|| img.display().to_string())?;
    let mut vm = Vm::spawn(
        o.launch(&[
            "--net".into(),
            format!("tap={tap},mac={mac},bw=0,pps=0"),
            "--disk".into(),
            format!("path={}", img.display()),
        ])
        .netns(&ns),
    )?;
    vm.expect("PROBE READY", T)?;
    let tid = vm.device_thread()?;
    let khz = tsc_khz(&mut vm)?;
    eprintln!("net: TAP {tap} in netns {}; device thread {tid}", ns.name);

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
                    if let Some(n) = recv_frame_into(&sock, &mut b, Duration::from_millis(50)) {
                        if n == usize::from(SIZE) && b[6..12] == GUEST_MAC && b[12..14] == ETHERTYPE
                        {
                            seen.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let c0 = vm.cpu(tid)?;
        let t0 = Instant::now();
        let line = vm.command(
            &format!("net-send 0 {} {SIZE}", o.net_frames),
            "PROBE NET-SEND",
        )?;
        let secs = t0.elapsed().as_secs_f64();
        let c1 = vm.cpu(tid)?;
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        counter.join().unwrap();
        let sent = num_field(&line, "sent")?;
        let cycles = num_field(&line, "cycles")?;
        let bytes = sent * f64::from(SIZE);
        let (dt, ds) = c0.until(c1);
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
        let c0 = vm.cpu(tid)?;
        let t0 = Instant::now();
        let (got, lost) = echo_stream(&sock, o.echo_frames, o.echo_window, usize::from(SIZE));
        let secs = t0.elapsed().as_secs_f64();
        let c1 = vm.cpu(tid)?;
        let (dt, ds) = c0.until(c1);
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
    cpu_rows(&tx_cpu, &tx_sched);
    header(
        &format!(
            "Net, host -> guest -> host: net-echo, {} frames of {SIZE} bytes, window {}",
            o.echo_frames, o.echo_window
        ),
        o.runs,
    );
    row("echoed throughput (each way)", "Mb/s", &e_mbps, 0);
    row("frames lost (resent after 200 ms)", "frames", &e_lost, 0);
    cpu_rows(&e_cpu, &e_sched);
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
        bail!("the probe could not measure its TSC: {line}");
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
            if try_send_frame(sock, &host_frame(next, size)).is_err() {
                break;
            }
            in_flight.insert(next);
            next += 1;
        }
        match recv_frame_into(sock, &mut buf, Duration::from_millis(200)) {
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
                    let _ = try_send_frame(sock, &host_frame(seq, size));
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
        try_send_frame(sock, &host_frame(seq, 64)).context("send")?;
        loop {
            let left = Duration::from_secs(2).saturating_sub(t0.elapsed());
            let Some(k) = recv_frame_into(sock, &mut buf, left) else {
                bail!("echo {i} did not come back within 2 s");
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

/// `ksmvm-bench io`.
pub fn run(args: &IoArgs) -> Result<()> {
    let o = Opts::new(args)?;
    for (what, p) in [("ksmvm", &o.ksmvm), ("probe", &o.probe)] {
        if !p.exists() {
            bail!(
                "{what} not found at {} (make build, or --{what} PATH)",
                p.display()
            );
        }
    }
    println!("machine: {}", machine());
    let mut failed = Vec::new();
    if matches!(args.what, What::Block | What::All) {
        if let Err(e) = block(&o) {
            eprintln!("block: {e:#}");
            failed.push("block");
        }
    }
    if matches!(args.what, What::Net | What::All) {
        if let Err(e) = net(&o) {
            eprintln!("net: {e:#}");
            failed.push("net");
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("io: {} failed", failed.join(" and "))
    }
}
