//! `ksmvm-bench ksm-tuning`: for each KSM setting (pages_to_scan x
//! sleep_millisecs, and the advisor's scan-time targets), fresh guests boot
//! with ksmd stopped, then the setting is applied and the run measures the
//! time until KSM has saved a target fraction (default 90 %) of the ideal
//! savings, and ksmd's CPU over that time. The plot shows the trade-off and
//! its Pareto frontier (no other setting is both faster and cheaper).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use ksmvm::ksm::{AdvisorMode, KsmTuning};
use ksmvm::stats::ApproxF64;
use ksmvm_testkit::RuntimeDir;
use serde::Serialize;

use crate::cancel;
use crate::common::{bar, OutArgs, VmmArgs};
use crate::fleet::Fleet;
use crate::guest::{GuestSpec, Launcher};
use crate::host::{mib, preflight, MemInfo, Needs, PAGE_SIZE};
use crate::ksm_session::KsmSession;
use crate::ksmd::KsmdMeter;
use crate::machine::Machine;
use crate::output::ResultsDir;
use crate::plot::{self, Chart, Series, Style};
use crate::profile::Profile;

use crate::table::{opt1, Table};

#[derive(Args, Debug)]
pub struct TuningArgs {
    #[command(flatten)]
    pub vmm: VmmArgs,
    #[command(flatten)]
    pub out: OutArgs,
    #[arg(long, default_value = "small")]
    pub profile: String,
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(2..=64))]
    pub guests: u64,
    /// pages_to_scan values (advisor off).
    #[arg(long, value_delimiter = ',', default_value = "2000,10000,40000")]
    pub pages_to_scan: Vec<u64>,
    /// sleep_millisecs values (advisor off).
    #[arg(long, value_delimiter = ',', default_value = "10,50,200")]
    pub sleep_ms: Vec<u64>,
    /// advisor_target_scan_time values, seconds (advisor_mode = scan-time);
    /// empty to skip. Ignored on kernels without the advisor.
    #[arg(long, value_delimiter = ',', default_value = "1,5,20")]
    pub advisor_scan_time: Vec<u64>,
    /// The fraction of the ideal savings that counts as "merged".
    #[arg(long, default_value_t = 0.9)]
    pub target_fraction: f64,
    /// Longest wait per setting, s.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    #[arg(long, default_value_t = 200)]
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TuningPoint {
    pub setting: String,
    pub advisor: bool,
    pub pages_to_scan: Option<u64>,
    pub sleep_millisecs: u64,
    pub advisor_target_scan_time: Option<u64>,
    /// Seconds to reach the target fraction; None: not within the timeout.
    pub time_to_target_s: Option<f64>,
    /// Mean ksmd CPU over that time (or the timeout), % of one CPU.
    pub ksmd_cpu_pct: Option<f64>,
    pub ksmd_cpu_seconds: Option<f64>,
    /// Fraction of the ideal savings reached at the end.
    pub reached_fraction: f64,
    /// pages_to_scan the advisor had chosen at the end.
    pub final_pages_to_scan: Option<u64>,
    /// On the Pareto frontier (no other setting both faster and cheaper).
    pub frontier: bool,
}

struct Setting {
    label: String,
    tuning: KsmTuning,
}

fn settings(args: &TuningArgs, has_advisor: bool) -> Vec<Setting> {
    let mut out = Vec::new();
    for &p in &args.pages_to_scan {
        for &s in &args.sleep_ms {
            out.push(Setting {
                label: format!("{p}/{s}ms"),
                tuning: KsmTuning {
                    advisor_mode: has_advisor.then_some(AdvisorMode::None),
                    pages_to_scan: Some(p),
                    sleep_millisecs: Some(s),
                    enabled: Some(true),
                    ..Default::default()
                },
            });
        }
    }
    if has_advisor {
        for &t in &args.advisor_scan_time {
            out.push(Setting {
                label: format!("advisor {t}s"),
                tuning: KsmTuning {
                    advisor_mode: Some(AdvisorMode::ScanTime),
                    advisor_target_scan_time: Some(t),
                    sleep_millisecs: Some(20),
                    enabled: Some(true),
                    ..Default::default()
                },
            });
        }
    }
    out
}

pub fn run(args: TuningArgs) -> Result<()> {
    preflight(
        Needs {
            kvm: true,
            ksm_control: true,
        },
        &args.vmm.ksmvm,
        &args.vmm.probe,
    )?;
    if args.target_fraction.is_nan() || args.target_fraction <= 0.0 || args.target_fraction > 1.0 {
        bail!("--target-fraction must be in (0, 1]");
    }
    let profile = args.vmm.profiles()?.get(&args.profile)?.clone();
    let need = args.guests * profile.footprint_bytes() + (2 << 30);
    if need > MemInfo::read()?.available {
        bail!(
            "{} guests of profile {} do not fit in MemAvailable with 2 GiB to spare",
            args.guests,
            profile.name
        );
    }
    let mut session = KsmSession::begin(args.vmm.assume_host_lock)?;
    let has_advisor = session.saved().is_some_and(|s| s.advisor_mode.is_some());
    for s in settings(&args, has_advisor) {
        s.tuning.validate()?;
    }
    let runtime = RuntimeDir::create("bench-tuning")?;
    let launcher = args.vmm.launcher(&runtime)?;
    let mut results = ResultsDir::create(&args.out.results, "ksm-tuning")?;
    let all = settings(&args, has_advisor);
    let b = bar(all.len() as u64, "KSM settings");
    let mut points = Vec::new();
    for s in &all {
        b.set_message(s.label.clone());
        points.push(measure(&args, &session, &launcher, &profile, s)?);
        b.inc(1);
    }
    b.finish_and_clear();
    session.restore()?;
    mark_frontier(&mut points);

    results.csv("ksm_tuning.csv", &points)?;
    results.json(
        "ksm_tuning.json",
        &serde_json::json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "machine": Machine::describe(),
            "profile": profile,
            "guests": args.guests,
            "target_fraction": args.target_fraction,
            "ideal_saved_mib": mib(profile.ideal_pages_sharing(args.guests) * PAGE_SIZE),
            "points": points,
        }),
    )?;
    if let Err(e) = plot_points(&results, &points, args.target_fraction) {
        eprintln!("plots: {e:#}");
    }
    let mut t = Table::new([
        "setting",
        "time to target s",
        "ksmd CPU %",
        "ksmd CPU s",
        "reached %",
        "frontier",
    ]);
    for p in &points {
        t.row([
            p.setting.clone(),
            opt1(p.time_to_target_s),
            opt1(p.ksmd_cpu_pct),
            opt1(p.ksmd_cpu_seconds),
            format!("{:.0}", 100.0 * p.reached_fraction),
            if p.frontier {
                "*".into()
            } else {
                String::new()
            },
        ]);
    }
    println!(
        "{} guests of profile {}; target: {:.0} % of the ideal {:.0} MiB saved",
        args.guests,
        profile.name,
        100.0 * args.target_fraction,
        mib(profile.ideal_pages_sharing(args.guests) * PAGE_SIZE)
    );
    print!("{}", t.render());
    println!("results: {}", results.path().display());
    Ok(())
}

/// Lets ksmd (fast) finish two full scans, then stops it. ksmd drops the
/// merged pages of exited processes only while it runs, so without this the
/// previous setting's guests would still count in pages_sharing and vanish
/// from it during the next measurement.
fn settle_ksmd(session: &KsmSession) -> Result<()> {
    session.tune(&crate::ksm_session::fast_tuning())?;
    let start = session.counters()?.full_scans.unwrap_or(0);
    let end = Instant::now() + Duration::from_secs(60);
    while session.counters()?.full_scans.unwrap_or(0) < start + 2 && Instant::now() < end {
        cancel::sleep(Duration::from_millis(50))?;
    }
    session.ksm().disable()?;
    Ok(())
}

fn measure(
    args: &TuningArgs,
    session: &KsmSession,
    launcher: &Launcher,
    p: &Profile,
    s: &Setting,
) -> Result<TuningPoint> {
    // A clean start; nothing merges while the guests fill their memory.
    settle_ksmd(session)?;
    let mut fleet = Fleet::new();
    let specs: Vec<GuestSpec> = (1..=args.guests)
        .map(|i| GuestSpec::probe(format!("tune-{i}"), p, i, true))
        .collect();
    fleet.start_all(
        launcher,
        &specs,
        Duration::ZERO,
        Duration::from_secs(60),
        &indicatif::ProgressBar::hidden(),
    )?;
    let base = session.counters()?.pages_sharing.unwrap_or(0);
    let ideal = p.ideal_pages_sharing(args.guests).max(1).approx_f64();
    let meter = KsmdMeter::new();
    let cpu0 = meter.cpu_seconds();
    session.tune(&s.tuning)?;
    let t0 = Instant::now();
    let timeout = Duration::from_secs(args.timeout_s);
    let mut reached: f64;
    let hit = loop {
        fleet.check_alive()?;
        let sharing = session.counters()?.pages_sharing.unwrap_or(0);
        reached = sharing.saturating_sub(base).approx_f64() / ideal;
        if reached >= args.target_fraction {
            break Some(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() >= timeout {
            break None;
        }
        cancel::sleep(Duration::from_millis(args.interval_ms))?;
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu_s = match (cpu0, meter.cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let final_pages = session.ksm().settings().ok().and_then(|k| k.pages_to_scan);
    session.ksm().disable()?;
    fleet.stop_all();
    Ok(TuningPoint {
        setting: s.label.clone(),
        advisor: s.tuning.advisor_mode == Some(AdvisorMode::ScanTime),
        pages_to_scan: s.tuning.pages_to_scan,
        sleep_millisecs: s.tuning.sleep_millisecs.unwrap_or(20),
        advisor_target_scan_time: s.tuning.advisor_target_scan_time,
        time_to_target_s: hit,
        ksmd_cpu_pct: cpu_s.map(|c| 100.0 * c / elapsed.max(1e-3)),
        ksmd_cpu_seconds: cpu_s,
        reached_fraction: reached,
        final_pages_to_scan: final_pages,
        frontier: false,
    })
}

/// Marks the points no other point beats on both time and CPU.
pub fn mark_frontier(points: &mut [TuningPoint]) {
    let key = |p: &TuningPoint| Some((p.time_to_target_s?, p.ksmd_cpu_pct?));
    let keys: Vec<Option<(f64, f64)>> = points.iter().map(key).collect();
    for (i, p) in points.iter_mut().enumerate() {
        p.frontier = keys[i].is_some_and(|(t, c)| {
            !keys.iter().enumerate().any(|(j, k)| {
                j != i && k.is_some_and(|(t2, c2)| t2 <= t && c2 <= c && (t2 < t || c2 < c))
            })
        });
    }
}

fn plot_points(results: &ResultsDir, points: &[TuningPoint], fraction: f64) -> Result<()> {
    let pt = |p: &TuningPoint| Some((p.ksmd_cpu_pct?, p.time_to_target_s?));
    let manual: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| !p.advisor)
        .filter_map(pt)
        .collect();
    let advisor: Vec<(f64, f64)> = points.iter().filter(|p| p.advisor).filter_map(pt).collect();
    let mut frontier: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.frontier)
        .filter_map(pt)
        .collect();
    frontier.sort_by(|a, b| a.0.total_cmp(&b.0));
    let labels = points
        .iter()
        .filter_map(|p| pt(p).map(|(x, y)| (x, y, p.setting.clone())))
        .collect();
    let mut chart = Chart {
        title: format!(
            "Time to {:.0} % of ideal KSM savings vs ksmd CPU",
            100.0 * fraction
        ),
        x_label: "ksmd CPU, % of one CPU (mean until the target)".into(),
        y_label: "seconds".into(),
        series: vec![
            Series::new("pages_to_scan / sleep_millisecs", manual, Style::Points),
            Series::new("advisor scan-time", advisor, Style::Points),
            Series::new("Pareto frontier", frontier, Style::Line),
        ],
        legend_right: true,
    };
    chart.series.retain(|s| !s.points.is_empty());
    plot::write_labelled(&chart, labels, results.path(), "ksm_tuning")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: Option<f64>, c: f64) -> TuningPoint {
        TuningPoint {
            setting: String::new(),
            advisor: false,
            pages_to_scan: None,
            sleep_millisecs: 20,
            advisor_target_scan_time: None,
            time_to_target_s: t,
            ksmd_cpu_pct: Some(c),
            ksmd_cpu_seconds: None,
            reached_fraction: 1.0,
            final_pages_to_scan: None,
            frontier: false,
        }
    }

    #[test]
    fn frontier_keeps_undominated_points() {
        let mut pts = vec![
            p(Some(10.0), 5.0),  // slow, cheap: frontier
            p(Some(2.0), 50.0),  // fast, expensive: frontier
            p(Some(12.0), 20.0), // dominated by the first
            p(Some(5.0), 20.0),  // frontier
            p(None, 1.0),        // never reached: not on it
        ];
        mark_frontier(&mut pts);
        let f: Vec<bool> = pts.iter().map(|p| p.frontier).collect();
        assert_eq!(f, vec![true, true, false, true, false]);
    }

    #[test]
    fn default_grid_is_valid() {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            a: TuningArgs,
        }
        let w = W::parse_from(["x"]);
        let s = settings(&w.a, true);
        assert_eq!(s.len(), 9 + 3);
        for s in &s {
            s.tuning.validate().unwrap();
        }
        assert_eq!(settings(&w.a, false).len(), 9);
    }
}
