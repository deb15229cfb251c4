//! `ksmvm-bench compare --with "CMD"`: the `boot` measurement for ksmvm and
//! for another VMM command line, side by side, with ratios (other / ksmvm).
//!
//! In CMD, `{kernel}`, `{cmdline}`, `{mem_mib}` and `{name}` are replaced by
//! the probe path, the probe command line of the profile, its memory size
//! and a per-boot name; `{initrd}` by the profile's memory image (a profile
//! with an image needs it, e.g. `-initrd {initrd}`). CMD runs under `sh -c "exec CMD"`; its stdout must be
//! the guest's serial console; "ready" is the first line containing
//! `--ready-pattern` (default `PROBE READY`; another VMM may boot another
//! guest, e.g. a Linux kernel with the pattern of its last boot line). The
//! other VMM is stopped with SIGTERM (SIGKILL after 3 s); its guest RAM is taken to be every
//! anonymous or shared-memory mapping of at least half the guest's memory.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use ksmvm_testkit::{Launch, RuntimeDir};
use serde::Serialize;

use crate::boot::{self, BootSummary, BootTarget};
use crate::common::{OutArgs, VmmArgs};
use crate::host::{preflight, Needs};
use crate::output::ResultsDir;
use crate::shell::sh_quote;
use crate::summary::Summary;
use crate::table::Table;

#[derive(Args, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    pub vmm: VmmArgs,
    #[command(flatten)]
    pub out: OutArgs,
    /// The other VMM's command line (placeholders: {kernel} {cmdline} {mem_mib} {name} {initrd}).
    #[arg(long = "with")]
    pub with: String,
    /// A short name for the other VMM in tables and plots.
    #[arg(long, default_value = "other")]
    pub label: String,
    /// The serial line that means the guest is ready.
    #[arg(long, default_value = "PROBE READY")]
    pub ready_pattern: String,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub runs: u64,
    #[arg(long, default_value = "tiny")]
    pub profile: String,
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
}

#[derive(Debug, Serialize)]
pub struct Ratio {
    pub metric: String,
    pub ksmvm_median: Option<f64>,
    pub other_median: Option<f64>,
    /// other / ksmvm (> 1: ksmvm is faster / smaller).
    pub ratio: Option<f64>,
}

/// `{key}` replacement, without touching other braces.
pub fn expand(template: &str, vars: &[(&str, &str)]) -> String {
    let mut s = template.to_string();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

pub fn run(args: CompareArgs) -> Result<()> {
    preflight(
        Needs {
            kvm: true,
            ksm_control: false,
        },
        &args.vmm.ksmvm,
        &args.vmm.probe,
    )?;
    if args.ready_pattern.is_empty() {
        bail!("--ready-pattern must not be empty");
    }
    let profile = args.vmm.profiles()?.get(&args.profile)?.clone();
    if profile.image.is_some() && !args.with.contains("{initrd}") {
        bail!(
            "profile {} replays a memory image: --with must pass it to the guest as its initrd \
             ({{initrd}})",
            profile.name
        );
    }
    let runtime = RuntimeDir::create("bench-compare")?;
    let mine = boot::ksmvm_target(&args.vmm, &runtime, &profile)?;
    let template = args.with.clone();
    let probe = args.vmm.probe.display().to_string();
    let prof = profile.clone();
    let initrd = profile
        .image
        .as_ref()
        .map_or(String::new(), |p| sh_quote(&p.display().to_string()));
    let shown = template.clone();
    let other = BootTarget {
        label: args.label.clone(),
        shown,
        make: Box::new(move |i| {
            let name = format!("compare-{i}");
            let line = expand(
                &template,
                &[
                    ("kernel", &sh_quote(&probe)),
                    ("cmdline", &sh_quote(&prof.cmdline(i))),
                    ("mem_mib", &prof.mem_mib.to_string()),
                    ("name", &name),
                    ("initrd", &initrd),
                ],
            );
            let c = Launch::program("sh")
                .arg("-c")
                .arg(format!("exec {line}"))
                .inherit_runtime_dir();
            (c, name)
        }),
        api_socket: None,
        mem_mib: profile.mem_mib,
        is_ksmvm: false,
        poweroff: false,
        ready_pattern: args.ready_pattern.clone(),
    };
    let timeout = Duration::from_secs(args.timeout_s);
    let mut results = ResultsDir::create(&args.out.results, "compare")?;
    // Interleaved in two halves so that drift in host load hits both alike.
    let half = args.runs.div_ceil(2);
    let mut runs = boot::measure(&mine, half, timeout)?;
    runs.extend(boot::measure(&other, half, timeout)?);
    runs.extend(renumber(
        boot::measure(&mine, args.runs - half, timeout)?,
        half,
    ));
    runs.extend(renumber(
        boot::measure(&other, args.runs - half, timeout)?,
        half,
    ));
    let split = |label: &str| {
        runs.iter()
            .filter(|r| r.vmm == label)
            .cloned()
            .collect::<Vec<_>>()
    };
    let a = BootSummary::of("ksmvm", mine.shown.clone(), &split("ksmvm"));
    let b = BootSummary::of(&args.label, other.shown.clone(), &split(&args.label));
    let ratios = ratios(&a, &b);
    boot::write_results(&mut results, &runs, &[a.clone(), b.clone()])?;
    results.json("ratios.json", &ratios)?;
    results.csv("ratios.csv", &ratios)?;
    boot::print_summaries(&[a, b]);
    let mut t = Table::new(["metric (median)", "ksmvm", &args.label, "ratio other/ksmvm"]);
    let show = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}"));
    for r in &ratios {
        t.row([
            r.metric.clone(),
            show(r.ksmvm_median),
            show(r.other_median),
            show(r.ratio),
        ]);
    }
    print!("\n{}", t.render());
    println!("results: {}", results.path().display());
    Ok(())
}

fn renumber(mut runs: Vec<boot::BootRun>, offset: u64) -> Vec<boot::BootRun> {
    for r in &mut runs {
        r.run += offset;
    }
    runs
}

fn ratios(a: &BootSummary, b: &BootSummary) -> Vec<Ratio> {
    let med = |s: Option<Summary>| s.map(|s| s.median);
    let pairs = [
        (
            "exec -> first serial byte (ms)",
            a.exec_to_first_byte_ms,
            b.exec_to_first_byte_ms,
        ),
        ("exec -> READY (ms)", a.exec_to_ready_ms, b.exec_to_ready_ms),
        (
            "VMM overhead RSS (MiB)",
            a.overhead_rss_mib,
            b.overhead_rss_mib,
        ),
    ];
    pairs
        .into_iter()
        .map(|(m, x, y)| {
            let (x, y) = (med(x), med(y));
            Ratio {
                metric: m.into(),
                ksmvm_median: x,
                other_median: y,
                ratio: match (x, y) {
                    (Some(x), Some(y)) if x > 0.0 => Some(y / x),
                    _ => None,
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_placeholders_only() {
        let s = expand(
            "vmm --k {kernel} --m {mem_mib} {other}",
            &[("kernel", "'/p'"), ("mem_mib", "64")],
        );
        assert_eq!(s, "vmm --k '/p' --m 64 {other}");
    }
}
