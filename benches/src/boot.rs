//! `ksmvm-bench boot` (and the measurement `compare` repeats for another
//! VMM): per run, exec -> API socket accepting, exec -> first serial byte,
//! exec -> PROBE READY, and the VMM's overhead RSS (process RSS minus guest
//! RAM Rss) once the guest is READY.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use ksmvm::instance::socket_path_in;
use ksmvm::stats::ApproxF64;
use ksmvm_testkit::{Launch, RuntimeDir};
use serde::Serialize;

use crate::cancel;
use crate::common::{bar, OutArgs, VmmArgs};
use crate::guest::{Guest, GuestSpec};
use crate::host::{mib, preflight, Needs};
use crate::machine::Machine;
use crate::output::ResultsDir;
use crate::plot::{self, Chart, Series, Style};
use crate::profile::Profile;
use crate::shell::command_line;
use crate::summary::Summary;
use crate::table::Table;
use crate::vmstats::VmStatsSource;

/// Targets from the foundation issue.
pub const TARGET_FIRST_BYTE_MS: f64 = 6.0;
pub const TARGET_OVERHEAD_MIB: f64 = 3.0;

#[derive(Args, Debug, Clone)]
pub struct BootArgs {
    #[command(flatten)]
    pub vmm: VmmArgs,
    #[command(flatten)]
    pub out: OutArgs,
    /// Number of boots.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub runs: u64,
    /// Memory profile of the guest.
    #[arg(long, default_value = "tiny")]
    pub profile: String,
    /// Longest wait for READY per boot, s.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
}

/// One boot.
#[derive(Debug, Clone, Serialize)]
pub struct BootRun {
    pub vmm: String,
    pub run: u64,
    pub exec_to_api_ms: Option<f64>,
    pub exec_to_first_byte_ms: Option<f64>,
    pub exec_to_ready_ms: f64,
    pub process_rss_mib: Option<f64>,
    pub guest_rss_mib: Option<f64>,
    pub overhead_rss_mib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BootSummary {
    pub vmm: String,
    pub command: String,
    pub runs: usize,
    pub exec_to_api_ms: Option<Summary>,
    pub exec_to_first_byte_ms: Option<Summary>,
    pub exec_to_ready_ms: Option<Summary>,
    pub overhead_rss_mib: Option<Summary>,
}

impl BootSummary {
    pub fn of(vmm: &str, command: String, runs: &[BootRun]) -> Self {
        Self {
            vmm: vmm.into(),
            command,
            runs: runs.len(),
            exec_to_api_ms: Summary::of(runs.iter().filter_map(|r| r.exec_to_api_ms)),
            exec_to_first_byte_ms: Summary::of(runs.iter().filter_map(|r| r.exec_to_first_byte_ms)),
            exec_to_ready_ms: Summary::of(runs.iter().map(|r| r.exec_to_ready_ms)),
            overhead_rss_mib: Summary::of(runs.iter().filter_map(|r| r.overhead_rss_mib)),
        }
    }
}

/// The API socket path of the VM with a given name.
pub type SocketPath = Box<dyn Fn(&str) -> PathBuf>;

/// How one boot is started and looked at.
pub struct BootTarget {
    pub label: String,
    /// Shown in results: the command line, as a user would type it.
    pub shown: String,
    /// Boot `i`: what to start (the kit's launcher) and the VM's name.
    pub make: Box<dyn Fn(u64) -> (Launch, String)>,
    /// Where the API socket of boot `i` appears, if the VMM has one.
    pub api_socket: Option<SocketPath>,
    pub mem_mib: u64,
    /// ksmvm: guest RAM found exactly; other VMMs: by a size heuristic.
    pub is_ksmvm: bool,
    /// Stop with `poweroff` on the serial input (the probe), else SIGTERM
    /// (SIGKILL after 3 s).
    pub poweroff: bool,
    /// The serial line (substring) that means the guest is ready.
    pub ready_pattern: String,
}

impl std::fmt::Debug for BootTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootTarget")
            .field("label", &self.label)
            .field("shown", &self.shown)
            .field("api_socket", &self.api_socket.is_some())
            .field("mem_mib", &self.mem_mib)
            .field("is_ksmvm", &self.is_ksmvm)
            .field("poweroff", &self.poweroff)
            .field("ready_pattern", &self.ready_pattern)
            .finish_non_exhaustive()
    }
}

/// Boots `target` `runs` times, one after another.
pub fn measure(target: &BootTarget, runs: u64, timeout: Duration) -> Result<Vec<BootRun>> {
    let b = bar(runs, &format!("booting {}", target.label));
    // A capacity hint only.
    let mut out = Vec::with_capacity(usize::try_from(runs).unwrap_or(0));
    for i in 1..=runs {
        cancel::check()?;
        out.push(boot_once(target, i, timeout)?);
        b.inc(1);
    }
    b.finish_and_clear();
    Ok(out)
}

fn boot_once(target: &BootTarget, i: u64, timeout: Duration) -> Result<BootRun> {
    let (launch, name) = (target.make)(i);
    let socket = target.api_socket.as_ref().map(|f| f(&name));
    if let Some(s) = &socket {
        let _ = std::fs::remove_file(s);
    }
    let mut g = Guest::spawn_launch(launch, name, target.mem_mib)?;
    let t0 = g.spawned_at();
    let api = match &socket {
        Some(path) => wait_socket(path, t0, timeout)?,
        None => None,
    };
    let ready = g.wait_for(&target.ready_pattern, timeout)?.at;
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    // From /proc in every case, so that ksmvm and other VMMs are measured alike.
    let stats = if target.is_ksmvm {
        VmStatsSource::from_proc(g.pid(), target.mem_mib)
    } else {
        VmStatsSource::for_other_vmm(g.pid(), (target.mem_mib << 20) / 2)
    }
    .and_then(|mut s| s.sample());
    let stats = match stats {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("{}: no memory figures: {e:#}", target.label);
            None
        }
    };
    if target.poweroff {
        g.request_poweroff();
        let end = Instant::now() + Duration::from_secs(3);
        while !g.has_exited() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    g.terminate(Duration::from_secs(3));
    Ok(BootRun {
        vmm: target.label.clone(),
        run: i,
        exec_to_api_ms: api.map(ms),
        exec_to_first_byte_ms: g.first_byte_at().map(ms),
        exec_to_ready_ms: ms(ready),
        process_rss_mib: stats.as_ref().map(|s| mib(s.process_rss)),
        guest_rss_mib: stats.as_ref().map(|s| mib(s.guest_ram.rss)),
        overhead_rss_mib: stats.as_ref().map(|s| mib(s.vmm_overhead_bytes)),
    })
}

/// Polls (every 100 us) until the socket accepts a connection.
fn wait_socket(path: &Path, t0: Instant, timeout: Duration) -> Result<Option<Instant>> {
    loop {
        if UnixStream::connect(path).is_ok() {
            return Ok(Some(Instant::now()));
        }
        if t0.elapsed() > timeout {
            eprintln!(
                "API socket {} did not accept within {timeout:?}",
                path.display()
            );
            return Ok(None);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The ksmvm target for `profile`.
pub fn ksmvm_target(vmm: &VmmArgs, runtime: &RuntimeDir, profile: &Profile) -> Result<BootTarget> {
    let launcher = vmm.launcher(runtime)?;
    let shown_spec = GuestSpec::probe("boot-N".into(), profile, 1, true);
    let shown = command_line(&launcher.command(&shown_spec));
    let dir = runtime.path().to_path_buf();
    let api = launcher.caps.api_sock;
    let prof = profile.clone();
    let make_launcher = launcher.clone();
    Ok(BootTarget {
        label: "ksmvm".into(),
        shown,
        make: Box::new(move |i| {
            let spec = GuestSpec::probe(format!("boot-{i}"), &prof, i, true);
            (make_launcher.launch(&spec), spec.name)
        }),
        api_socket: api
            .then(|| Box::new(move |name: &str| socket_path_in(&dir, name)) as SocketPath),
        mem_mib: profile.mem_mib,
        is_ksmvm: true,
        poweroff: true,
        ready_pattern: "PROBE READY".into(),
    })
}

pub fn run(args: BootArgs) -> Result<()> {
    preflight(
        Needs {
            kvm: true,
            ksm_control: false,
        },
        &args.vmm.ksmvm,
        &args.vmm.probe,
    )?;
    let profile = args.vmm.profiles()?.get(&args.profile)?.clone();
    let runtime = RuntimeDir::create("bench-boot")?;
    let target = ksmvm_target(&args.vmm, &runtime, &profile)?;
    let mut results = ResultsDir::create(&args.out.results, "boot")?;
    println!("machine: {}", Machine::describe().one_line());
    let runs = measure(&target, args.runs, Duration::from_secs(args.timeout_s))?;
    let summary = BootSummary::of("ksmvm", target.shown.clone(), &runs);
    write_results(&mut results, &runs, std::slice::from_ref(&summary))?;
    print_summaries(std::slice::from_ref(&summary));
    println!("results: {}", results.path().display());
    Ok(())
}

pub fn write_results(
    results: &mut ResultsDir,
    runs: &[BootRun],
    summaries: &[BootSummary],
) -> Result<()> {
    results.csv("boot_runs.csv", runs)?;
    #[derive(Serialize)]
    struct Out<'a> {
        command: String,
        machine: Machine,
        targets: serde_json::Value,
        summaries: &'a [BootSummary],
    }
    results.json(
        "boot.json",
        &Out {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: Machine::describe(),
            targets: serde_json::json!({
                "exec_to_first_byte_ms": TARGET_FIRST_BYTE_MS,
                "overhead_rss_mib": TARGET_OVERHEAD_MIB,
            }),
            summaries,
        },
    )?;
    let mut series = Vec::new();
    for s in summaries {
        let mine: Vec<&BootRun> = runs.iter().filter(|r| r.vmm == s.vmm).collect();
        let pts = |f: &dyn Fn(&BootRun) -> Option<f64>| {
            mine.iter()
                .filter_map(|r| f(r).map(|v| (r.run.approx_f64(), v)))
                .collect::<Vec<_>>()
        };
        series.push(Series::new(
            format!("{}: exec -> first serial byte", s.vmm),
            pts(&|r| r.exec_to_first_byte_ms),
            Style::LinePoints,
        ));
        series.push(Series::new(
            format!("{}: exec -> READY", s.vmm),
            pts(&|r| Some(r.exec_to_ready_ms)),
            Style::LinePoints,
        ));
        series.push(Series::new(
            format!("{}: exec -> API socket", s.vmm),
            pts(&|r| r.exec_to_api_ms),
            Style::LinePoints,
        ));
    }
    series.retain(|s| !s.points.is_empty());
    let dir = results.path().to_path_buf();
    if let Err(e) = plot::write(
        &Chart {
            title: "Boot times per run".into(),
            x_label: "run".into(),
            y_label: "ms".into(),
            series,
            legend_right: true,
        },
        &dir,
        "boot_times",
    )
    .context("plotting")
    {
        eprintln!("{e:#}");
    }
    Ok(())
}

pub fn print_summaries(summaries: &[BootSummary]) {
    let mut t = Table::new([
        "min / median / max",
        "exec->API ms",
        "exec->1st byte ms",
        "exec->READY ms",
        "overhead RSS MiB",
    ]);
    for s in summaries {
        t.row([
            format!("{} ({} runs)", s.vmm, s.runs),
            Summary::show(s.exec_to_api_ms, 2),
            Summary::show(s.exec_to_first_byte_ms, 2),
            Summary::show(s.exec_to_ready_ms, 2),
            Summary::show(s.overhead_rss_mib, 2),
        ]);
    }
    print!("{}", t.render());
    for s in summaries {
        println!("{}: {}", s.vmm, s.command);
    }
    println!(
        "targets (foundation issue): exec -> first serial byte <= {TARGET_FIRST_BYTE_MS} ms, VMM overhead RSS <= {TARGET_OVERHEAD_MIB} MiB"
    );
}
