//! `ksmvm-bench density`: how many guests of a profile fit, with and
//! without KSM. Guests are added one at a time (staggered); at each listed
//! instance count the run waits for READY and, with KSM, for convergence,
//! then records host memory and every VM's stats. It never lets
//! MemAvailable fall below a safety margin, and with a budget it finds the
//! largest N whose converged host memory fits it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use ksmvm::stats::ApproxF64;
use ksmvm_testkit::RuntimeDir;
use serde::Serialize;

use crate::cancel;
use crate::common::{bar, OutArgs, VmmArgs};
use crate::fleet::Fleet;
use crate::guest::{GuestSpec, Launcher};
use crate::host::{gib, mib, preflight, MemInfo, Needs, GIB, MIB, PAGE_SIZE};
use crate::ksm_session::{fast_tuning, KsmSession};
use crate::machine::Machine;
use crate::monitor::{HostSample, MemoryFloor, Monitor, VmSample};
use crate::output::ResultsDir;
use crate::plot::{self, Chart, Series, Style};
use crate::profile::{mib_text, Profile};

use crate::table::{f1, opt1, Table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KsmChoice {
    On,
    Off,
    Both,
}

#[derive(Args, Debug)]
pub struct DensityArgs {
    #[command(flatten)]
    pub vmm: VmmArgs,
    #[command(flatten)]
    pub out: OutArgs,
    /// Memory profile (see benches/profiles.toml, `ksmvm-bench profiles`).
    #[arg(long, default_value = "mastodon-idle")]
    pub profile: String,
    /// Instance counts to measure at, comma-separated (guests are added
    /// incrementally up to the largest).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub instances: Vec<u64>,
    /// Run with KSM on, off, or both (off first).
    #[arg(long, value_enum, default_value = "both")]
    pub ksm: KsmChoice,
    /// Host memory budget for the guests, GiB: find the largest N that fits.
    #[arg(long)]
    pub budget_gib: Option<f64>,
    /// Delay between guest starts, ms.
    #[arg(long, default_value_t = 250)]
    pub stagger_ms: u64,
    /// Never start a guest that would leave less MemAvailable than this,
    /// MiB (default: the larger of 2 GiB and 10 % of MemTotal).
    #[arg(long)]
    pub safety_margin_mib: Option<u64>,
    /// Longest wait for KSM convergence at one instance count, s.
    #[arg(long, default_value_t = 300)]
    pub converge_timeout_s: u64,
    /// Host sampling interval, ms.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Per-VM stats every this many host samples (reading smaps of many
    /// large guests costs CPU).
    #[arg(long, default_value_t = 5)]
    pub vm_every: u64,
    /// Seconds to sample after READY when KSM is off.
    #[arg(long, default_value_t = 3)]
    pub settle_s: u64,
}

/// One measured point: `n` guests in `mode`, after READY (and convergence).
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub mode: String,
    pub n: u64,
    /// Host MemTotal - MemAvailable minus the baseline (other processes count too).
    pub host_used_mib: f64,
    /// Sum over VMs of guest Pss + KSM metadata + VMM overhead (only the guests).
    pub vms_effective_mib: Option<f64>,
    pub saved_mib: f64,
    pub pages_sharing: i64,
    /// Seconds from the last guest's READY to convergence (KSM on).
    pub converged_s: Option<f64>,
    /// ksmd CPU seconds over the wall time of the measurement, %.
    pub ksmd_cpu_avg_pct: Option<f64>,
    pub ideal_with_ksm_mib: f64,
    pub ideal_without_ksm_mib: f64,
}

/// Why a mode stopped adding guests.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    pub mode: String,
    /// Guests running at the end.
    pub n: u64,
    /// "target reached", "budget", "safety margin".
    pub limited_by: String,
}

#[derive(Debug, Serialize)]
struct Summary<'a> {
    command: String,
    machine: Machine,
    profile: &'a Profile,
    budget_gib: Option<f64>,
    safety_margin_mib: u64,
    points: &'a [Point],
    capacity: &'a [Capacity],
}

struct Plan<'a> {
    profile: &'a Profile,
    targets: Vec<u64>,
    max: u64,
    budget: Option<u64>,
    margin: u64,
    stagger: Duration,
    interval: Duration,
    converge_timeout: Duration,
    settle: Duration,
    vm_every: u64,
}

/// Everything one mode produced.
struct ModeRun {
    points: Vec<Point>,
    capacity: Capacity,
    host: Vec<HostSample>,
    vms: Vec<VmSample>,
}

pub fn run(args: DensityArgs) -> Result<()> {
    preflight(
        Needs {
            kvm: true,
            ksm_control: true,
        },
        &args.vmm.ksmvm,
        &args.vmm.probe,
    )?;
    let profiles = args.vmm.profiles()?;
    let profile = profiles.get(&args.profile)?.clone();
    let mut targets: Vec<u64> = args.instances.iter().copied().filter(|&n| n > 0).collect();
    targets.sort_unstable();
    targets.dedup();
    let Some(&max) = targets.last() else {
        bail!("--instances needs at least one count above 0");
    };
    let mem = MemInfo::read()?;
    let margin = args
        .safety_margin_mib
        .map_or_else(|| (2 * GIB).max(mem.total / 10), |m| m * MIB);
    let budget = match args.budget_gib {
        Some(g) if g.is_nan() || g <= 0.0 => bail!("--budget-gib must be positive"),
        Some(g) => {
            // g > 0 (checked above); `as` saturates a huge one, which the
            // check below then refuses.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "g is positive; the cast rounds down and saturates"
            )]
            let b = (g * GIB.approx_f64()) as u64;
            if b + margin > mem.available {
                bail!(
                    "a budget of {g} GiB is more than this host can give: MemAvailable is {:.1} GiB \
                     and {:.1} GiB stay free as a safety margin (--safety-margin-mib)",
                    gib(mem.available),
                    gib(margin)
                );
            }
            Some(b)
        }
        None => None,
    };
    let plan = Plan {
        profile: &profile,
        targets,
        max: if budget.is_some() { max.max(1000) } else { max },
        budget,
        margin,
        stagger: Duration::from_millis(args.stagger_ms),
        interval: Duration::from_millis(args.interval_ms.max(100)),
        converge_timeout: Duration::from_secs(args.converge_timeout_s),
        settle: Duration::from_secs(args.settle_s),
        vm_every: args.vm_every.max(1),
    };
    let modes: &[bool] = match args.ksm {
        KsmChoice::On => &[true],
        KsmChoice::Off => &[false],
        KsmChoice::Both => &[false, true],
    };
    let mut results = ResultsDir::create(&args.out.results, "density")?;
    println!(
        "density: profile {} ({} MiB guests: {}), instances {:?}{}, \
         safety margin {:.0} MiB; results in {}",
        profile.name,
        profile.mem_mib,
        profile.split_text(),
        plan.targets,
        budget.map_or(String::new(), |b| format!(", budget {:.1} GiB", gib(b))),
        mib(margin),
        results.path().display()
    );

    println!("machine: {}", Machine::describe().one_line());
    let mut session = KsmSession::begin(args.vmm.assume_host_lock)?;
    let runtime = RuntimeDir::create("bench-density")?;
    let launcher = args.vmm.launcher(&runtime)?;
    let mut runs = Vec::new();
    for &ksm_on in modes {
        runs.push(run_mode(&plan, &session, &launcher, ksm_on)?);
    }
    session.restore()?;

    let points: Vec<Point> = runs.iter().flat_map(|r| r.points.clone()).collect();
    let capacity: Vec<Capacity> = runs.iter().map(|r| r.capacity.clone()).collect();
    let host: Vec<HostSample> = runs.iter().flat_map(|r| r.host.clone()).collect();
    let vms: Vec<VmSample> = runs.iter().flat_map(|r| r.vms.clone()).collect();
    results.csv("points.csv", &points)?;
    results.csv("host_timeseries.csv", &host)?;
    results.csv("vm_timeseries.csv", &vms)?;
    results.json(
        "density.json",
        &Summary {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: Machine::describe(),
            profile: &profile,
            budget_gib: args.budget_gib,
            safety_margin_mib: margin / MIB,
            points: &points,
            capacity: &capacity,
        },
    )?;
    let plots = write_plots(&mut results, &profile, &runs);

    print_report(&points, &capacity, budget);
    match plots {
        Ok(()) => {}
        Err(e) => eprintln!("plots: {e:#}"),
    }
    println!("results: {}", results.path().display());
    Ok(())
}

fn run_mode(
    plan: &Plan,
    session: &KsmSession,
    launcher: &Launcher,
    ksm_on: bool,
) -> Result<ModeRun> {
    let mode = if ksm_on { "ksm-on" } else { "ksm-off" };
    let p = plan.profile;
    // KSM off: ksmd stopped, so nothing merges even where the VMM cannot
    // leave guest RAM unmergeable. KSM on: the fast tuning.
    if ksm_on {
        session.tune(&fast_tuning())?;
    } else {
        session.ksm().disable()?;
    }
    let mut mon = Monitor::new(session.ksm().clone())?;
    mon.floor = Some(MemoryFloor {
        emergency_available: plan.margin / 2,
    });
    mon.phase = format!("{mode} n=0");
    let mut fleet = Fleet::new();
    let b = bar(plan.targets.last().copied().unwrap_or(1), mode);
    let mut points = Vec::new();
    let mut converged_since_add = true;
    let mut last_vm_sample = 0u64;
    let mut tick = 0u64;
    let limited_by = loop {
        cancel::check()?;
        let n = fleet.len() as u64;
        if n >= plan.max {
            break "target reached".to_string();
        }
        let m = MemInfo::read()?;
        let foot = p.footprint_bytes();
        let margin_ok = m.available.saturating_sub(foot) >= plan.margin;
        let budget_ok = match plan.budget {
            Some(b) => mon.guests_cost(&fleet)? + foot <= b,
            None => true,
        };
        if !(margin_ok && budget_ok) {
            if ksm_on && !converged_since_add {
                // Merging may free enough for one more.
                mon.phase = format!("{mode} n={n} (merging to make room)");
                mon.wait_converged(&mut fleet, plan.interval, plan.converge_timeout, false, &b)?;
                converged_since_add = true;
                continue;
            }
            if !margin_ok {
                break "safety margin".to_string();
            }
            if !ksm_on {
                break "budget".to_string();
            }
            // KSM on and converged: one more guest may still fit once it is
            // merged; try it and take it back if it does not.
            add_guest(plan, &mut fleet, launcher, &mut mon, ksm_on)?;
            let conv =
                mon.wait_converged(&mut fleet, plan.interval, plan.converge_timeout, false, &b)?;
            let used = mon.guests_cost(&fleet)?;
            if conv.is_none() || plan.budget.is_some_and(|bud| used > bud) {
                fleet.stop_last();
                break "budget".to_string();
            }
            b.set_position(fleet.len() as u64);
            if plan.targets.contains(&(fleet.len() as u64)) {
                points.push(measure(plan, &mut fleet, &mut mon, ksm_on, &b)?);
            }
            continue;
        }
        add_guest(plan, &mut fleet, launcher, &mut mon, ksm_on)?;
        converged_since_add = false;
        b.set_position(fleet.len() as u64);
        let n = fleet.len() as u64;
        if plan.targets.contains(&n) {
            points.push(measure(plan, &mut fleet, &mut mon, ksm_on, &b)?);
            converged_since_add = ksm_on;
            last_vm_sample = tick;
        } else {
            tick += 1;
            let vms = tick - last_vm_sample >= plan.vm_every;
            if vms {
                last_vm_sample = tick;
            }
            mon.sample(&fleet, vms)?;
        }
    };
    // The final count, if it was not a listed one.
    let n = fleet.len() as u64;
    if n > 0 && points.last().is_none_or(|pt: &Point| pt.n != n) {
        points.push(measure(plan, &mut fleet, &mut mon, ksm_on, &b)?);
    }
    b.finish_and_clear();
    println!("{mode}: {n} guests ({limited_by})");
    let killed = fleet.stop_all();
    if killed > 0 {
        eprintln!("{mode}: {killed} guests did not power off and were killed");
    }
    wait_memory_back(&mon)?;
    Ok(ModeRun {
        points,
        capacity: Capacity {
            mode: mode.into(),
            n,
            limited_by,
        },
        host: std::mem::take(&mut mon.host),
        vms: std::mem::take(&mut mon.vms),
    })
}

/// Starts one guest and waits for READY.
fn add_guest(
    plan: &Plan,
    fleet: &mut Fleet,
    launcher: &Launcher,
    mon: &mut Monitor,
    ksm_on: bool,
) -> Result<()> {
    if !fleet.is_empty() {
        cancel::sleep(plan.stagger)?;
    }
    let i = fleet.len() as u64 + 1;
    let mode = if ksm_on { "on" } else { "off" };
    let spec = GuestSpec::probe(format!("density-{mode}-{i}"), plan.profile, i, ksm_on);
    let g = fleet.spawn(launcher, &spec)?;
    // Fill speed depends on host load; a 1 GiB probe takes about a second here.
    g.wait_ready(Duration::from_secs(120))?;
    mon.phase = format!("{} n={i}", if ksm_on { "ksm-on" } else { "ksm-off" });
    Ok(())
}

fn measure(
    plan: &Plan,
    fleet: &mut Fleet,
    mon: &mut Monitor,
    ksm_on: bool,
    b: &ProgressBar,
) -> Result<Point> {
    let n = fleet.len() as u64;
    let p = plan.profile;
    let (t0, cpu0) = (Instant::now(), mon.ksmd_cpu_seconds());
    let converged_s = if ksm_on {
        mon.wait_converged(fleet, plan.interval, plan.converge_timeout, false, b)?
    } else {
        let end = Instant::now() + plan.settle;
        while Instant::now() < end {
            mon.sample(fleet, false)?;
            cancel::sleep(plan.interval)?;
        }
        None
    };
    if ksm_on && converged_s.is_none() {
        eprintln!(
            "warning: KSM did not converge within {:?} at n={n}",
            plan.converge_timeout
        );
    }
    let s = mon.sample(fleet, true)?;
    let vm_rows: Vec<&VmSample> = mon.vms.iter().filter(|v| v.t_s == s.t_s).collect();
    let vms_effective_mib = vm_rows
        .iter()
        .map(|v| v.effective_mib.map(|e| e + v.vmm_overhead_mib))
        .sum::<Option<f64>>();
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, mon.ksmd_cpu_seconds()) {
        (Some(a), Some(b)) if elapsed > 0.0 => Some(100.0 * (b - a) / elapsed),
        _ => None,
    };
    Ok(Point {
        mode: if ksm_on { "ksm-on" } else { "ksm-off" }.into(),
        n,
        host_used_mib: s.host_used_mib,
        vms_effective_mib,
        saved_mib: s.saved_mib,
        pages_sharing: s.pages_sharing,
        converged_s,
        ksmd_cpu_avg_pct: cpu,
        ideal_with_ksm_mib: mib(p.ideal_with_ksm(n)),
        ideal_without_ksm_mib: mib(p.ideal_without_ksm(n)),
    })
}

/// After the guests stopped, waits (up to 20 s) for their memory to return.
fn wait_memory_back(mon: &Monitor) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        let m = MemInfo::read()?;
        if m.available + 256 * MIB >= mon.baseline.mem_available {
            break;
        }
        cancel::sleep(Duration::from_millis(250))?;
    }
    Ok(())
}

fn print_report(points: &[Point], capacity: &[Capacity], budget: Option<u64>) {
    let mut t = Table::new([
        "mode",
        "N",
        "host used",
        "VMs effective",
        "KSM saved",
        "ideal (KSM)",
        "ideal (no KSM)",
        "converged s",
        "ksmd CPU %",
    ]);
    for p in points {
        t.row([
            p.mode.clone(),
            p.n.to_string(),
            f1(p.host_used_mib),
            opt1(p.vms_effective_mib),
            f1(p.saved_mib),
            f1(p.ideal_with_ksm_mib),
            f1(p.ideal_without_ksm_mib),
            opt1(p.converged_s),
            opt1(p.ksmd_cpu_avg_pct),
        ]);
    }
    println!(
        "\nMemory in MiB (host used: change of MemTotal - MemAvailable since the mode started):"
    );
    print!("{}", t.render());
    for c in capacity {
        match budget {
            Some(b) if c.limited_by == "budget" => println!(
                "{}: the largest N that fits {:.1} GiB is {}",
                c.mode,
                gib(b),
                c.n
            ),
            _ => println!("{}: stopped at N = {} ({})", c.mode, c.n, c.limited_by),
        }
    }
}

fn write_plots(results: &mut ResultsDir, p: &Profile, runs: &[ModeRun]) -> Result<()> {
    let dir = results.path().to_path_buf();
    let mut series = Vec::new();
    for r in runs {
        let pts: Vec<(f64, f64)> = r
            .points
            .iter()
            .map(|pt| (pt.n.approx_f64(), pt.host_used_mib))
            .collect();
        series.push(Series::new(
            format!("{} (host MemAvailable)", r.capacity.mode),
            pts,
            Style::LinePoints,
        ));
        let eff: Vec<(f64, f64)> = r
            .points
            .iter()
            .filter_map(|pt| pt.vms_effective_mib.map(|e| (pt.n.approx_f64(), e)))
            .collect();
        series.push(Series::new(
            format!(
                "{} (sum over VMs: Pss + KSM metadata + VMM overhead)",
                r.capacity.mode
            ),
            eff,
            Style::Points,
        ));
    }
    let max_n = runs
        .iter()
        .flat_map(|r| r.points.iter().map(|pt| pt.n))
        .max()
        .unwrap_or(1);
    let ideal = |f: &dyn Fn(u64) -> u64| {
        (0..=max_n)
            .map(|n| (n.approx_f64(), mib(f(n))))
            .collect::<Vec<_>>()
    };
    series.push(Series::new(
        format!(
            "ideal with KSM: S + N*U = {} + N*{} MiB",
            mib_text(p.shared_pages()),
            mib_text(p.unique_pages())
        ),
        ideal(&|n| p.ideal_with_ksm(n)),
        Style::Dashed,
    ));
    series.push(Series::new(
        "ideal without KSM: N*(S+U+Z)",
        ideal(&|n| p.ideal_without_ksm(n)),
        Style::Dashed,
    ));
    plot::write(
        &Chart {
            title: format!("Host memory used vs guests (profile {})", p.name),
            x_label: "guests (N)".into(),
            y_label: "MiB".into(),
            series,
            legend_right: false,
        },
        &dir,
        "memory_vs_n",
    )?;

    let on: Vec<&ModeRun> = runs
        .iter()
        .filter(|r| r.capacity.mode == "ksm-on")
        .collect();
    if let Some(r) = on.first() {
        let merged: Vec<(f64, f64)> = r.host.iter().map(|h| (h.t_s, h.saved_mib)).collect();
        let ideal: Vec<(f64, f64)> = r
            .host
            .iter()
            .map(|h| {
                (
                    h.t_s,
                    mib(p.ideal_pages_sharing(h.guests as u64) * PAGE_SIZE),
                )
            })
            .collect();
        plot::write(
            &Chart {
                title: "Merged memory over time (KSM on)".into(),
                x_label: "seconds".into(),
                y_label: "MiB saved (pages_sharing growth x 4 KiB)".into(),
                series: vec![
                    Series::new("saved", merged, Style::Line),
                    Series::new("ideal for the guests running", ideal, Style::Dashed),
                ],
                legend_right: false,
            },
            &dir,
            "merged_over_time",
        )?;
    }
    let cpu: Vec<Series> = runs
        .iter()
        .map(|r| {
            Series::new(
                r.capacity.mode.clone(),
                r.host
                    .iter()
                    .filter_map(|h| h.ksmd_cpu_pct.map(|c| (h.t_s, c)))
                    .collect(),
                Style::Line,
            )
        })
        .collect();
    plot::write(
        &Chart {
            title: "ksmd CPU over time".into(),
            x_label: "seconds".into(),
            y_label: "% of one CPU".into(),
            series: cpu,
            legend_right: true,
        },
        &dir,
        "ksmd_cpu",
    )?;
    Ok(())
}
