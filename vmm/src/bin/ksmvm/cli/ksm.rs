//! `ksmvm ksm ...`: inspect and tune the host's KSM.

use ksmvm::outcome::{ExitStatus, HasExitStatus};
use ksmvm::stats::{page_size, ApproxF64};
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde::Serialize;
use thiserror::Error;

use ksmvm::ksm::{
    AdvisorMode, Ksm, KsmCounters, KsmError, KsmSettings, KsmStatus, KsmTuning, KsmdCpu,
};

#[derive(Debug, Subcommand)]
pub enum KsmCommand {
    /// Show KSM counters, settings and ksmd's CPU use.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// How long to measure ksmd's CPU use (0: do not measure).
        #[arg(long, default_value_t = 1000)]
        window_ms: u64,
    },
    /// Start ksmd (run=1).
    Enable,
    /// Stop ksmd (run=0); merged pages stay merged unless --unmerge.
    Disable {
        /// Also unmerge every merged page (run=2; needs memory for all copies).
        #[arg(long)]
        unmerge: bool,
    },
    /// Change KSM knobs (at least one).
    Tune(TuneArgs),
    /// Apply the knobs of a TOML file (e.g. /etc/ksmvm/ksm.toml).
    Apply { file: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl From<OnOff> for bool {
    fn from(v: OnOff) -> bool {
        v == OnOff::On
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AdvisorArg {
    None,
    ScanTime,
}

impl From<AdvisorArg> for AdvisorMode {
    fn from(v: AdvisorArg) -> Self {
        match v {
            AdvisorArg::None => AdvisorMode::None,
            AdvisorArg::ScanTime => AdvisorMode::ScanTime,
        }
    }
}

#[derive(Debug, Args)]
#[command(
    group(ArgGroup::new("knobs").required(true).multiple(true)),
    override_usage = "ksmvm ksm tune <OPTIONS>...  (at least one)"
)]
pub struct TuneArgs {
    /// Pages ksmd scans per wake-up (1..=100000; only with --advisor none).
    #[arg(long, group = "knobs")]
    pub pages_to_scan: Option<u64>,
    /// Milliseconds ksmd sleeps between batches.
    #[arg(long, group = "knobs")]
    pub sleep_ms: Option<u64>,
    /// Let the kernel size pages_to_scan (scan-time) or not (none; resets pages_to_scan to 100).
    #[arg(long, group = "knobs", value_enum)]
    pub advisor: Option<AdvisorArg>,
    /// Seconds the scan-time advisor aims for one full scan.
    #[arg(long = "advisor-target-scan-s", group = "knobs")]
    pub advisor_target_scan_s: Option<u64>,
    /// Merge all-zero pages with the zero page.
    #[arg(long, group = "knobs", value_enum)]
    pub use_zero_pages: Option<OnOff>,
    /// Most mappings of one KSM page (>= 2; only while nothing is merged).
    #[arg(long, group = "knobs")]
    pub max_page_sharing: Option<u64>,
    /// Merge pages of different NUMA nodes (only while nothing is merged).
    #[arg(long, group = "knobs", value_enum)]
    pub merge_across_nodes: Option<OnOff>,
}

impl From<TuneArgs> for KsmTuning {
    fn from(a: TuneArgs) -> Self {
        KsmTuning {
            pages_to_scan: a.pages_to_scan,
            sleep_millisecs: a.sleep_ms,
            advisor_mode: a.advisor.map(Into::into),
            advisor_target_scan_time: a.advisor_target_scan_s,
            use_zero_pages: a.use_zero_pages.map(Into::into),
            max_page_sharing: a.max_page_sharing,
            merge_across_nodes: a.merge_across_nodes.map(Into::into),
            enabled: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum KsmCliError {
    #[error(transparent)]
    Ksm(#[from] KsmError),
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

/// What `status --json` prints.
#[derive(Debug, Serialize)]
pub struct KsmReport {
    #[serde(flatten)]
    pub status: KsmStatus,
    /// None: not measured, or no ksmd visible (PID namespace).
    pub ksmd_cpu: Option<KsmdCpu>,
    pub page_size: u64,
}

pub fn run(cmd: KsmCommand) -> Result<(), KsmCliError> {
    run_with(&Ksm::new(), cmd, &mut io::stdout().lock())
}

/// [`run`] against any KSM root and output, for tests.
pub fn run_with(ksm: &Ksm, cmd: KsmCommand, out: &mut dyn Write) -> Result<(), KsmCliError> {
    match cmd {
        KsmCommand::Status { json, window_ms } => {
            let status = ksm.status()?;
            let ksmd_cpu = if window_ms == 0 {
                None
            } else {
                ksm.ksmd_cpu(Duration::from_millis(window_ms))?
            };
            let report = KsmReport {
                status,
                ksmd_cpu,
                page_size: page_size(),
            };
            if json {
                serde_json::to_writer_pretty(&mut *out, &report)?;
                writeln!(out)?;
            } else {
                print_table(&report, window_ms, out)?;
            }
        }
        KsmCommand::Enable => {
            ksm.enable()?;
            writeln!(out, "KSM enabled (run=1)")?;
        }
        KsmCommand::Disable { unmerge: false } => {
            ksm.disable()?;
            writeln!(out, "KSM disabled (run=0); merged pages stay merged")?;
        }
        KsmCommand::Disable { unmerge: true } => {
            ksm.unmerge_all()?;
            writeln!(out, "KSM disabled and all pages unmerged (run=2)")?;
        }
        KsmCommand::Tune(args) => {
            ksm.tune(&args.into())?;
            writeln!(out, "KSM tuned")?;
        }
        KsmCommand::Apply { file } => {
            ksm.apply_file(&file)?;
            writeln!(out, "applied {}", file.display())?;
        }
    }
    Ok(())
}

const NA: &str = "unavailable";

fn num<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| NA.to_owned(), |v| v.to_string())
}

fn pages(v: Option<u64>, page_size: u64) -> String {
    v.map_or_else(
        || NA.to_owned(),
        |p| format!("{p} ({})", mib(p.saturating_mul(page_size).approx_f64())),
    )
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn on_off(v: Option<bool>) -> String {
    v.map_or_else(
        || NA.to_owned(),
        |b| if b { "on" } else { "off" }.to_owned(),
    )
}

fn print_table(r: &KsmReport, window_ms: u64, out: &mut dyn Write) -> io::Result<()> {
    let KsmCounters {
        pages_shared,
        pages_sharing,
        pages_unshared,
        pages_volatile,
        pages_skipped,
        pages_scanned,
        full_scans,
        general_profit,
        ksm_zero_pages,
        stable_node_chains,
        stable_node_dups,
    } = &r.status.counters;
    let KsmSettings {
        run,
        pages_to_scan,
        sleep_millisecs,
        max_page_sharing,
        merge_across_nodes,
        use_zero_pages,
        stable_node_chains_prune_millisecs,
        advisor_mode,
        advisor_target_scan_time,
        advisor_max_cpu,
        advisor_min_pages_to_scan,
        advisor_max_pages_to_scan,
        smart_scan,
    } = &r.status.settings;
    let ps = r.page_size;
    let ksmd = match (&r.ksmd_cpu, window_ms) {
        (_, 0) => "not measured".to_owned(),
        (None, _) => "ksmd not visible".to_owned(),
        (Some(c), _) => format!(
            "{:.1}% of one CPU (pid {}, {} ms)",
            c.percent, c.pid, c.window_ms
        ),
    };
    let profit = general_profit.map_or_else(
        || NA.to_owned(),
        |b| format!("{b} bytes ({})", mib(b.approx_f64())),
    );
    let rows: [(&str, String); 25] = [
        ("run", num(*run)),
        ("ksmd cpu", ksmd),
        ("pages_shared", pages(*pages_shared, ps)),
        ("pages_sharing", pages(*pages_sharing, ps)),
        ("pages_unshared", pages(*pages_unshared, ps)),
        ("pages_volatile", pages(*pages_volatile, ps)),
        ("pages_skipped", num(*pages_skipped)),
        ("pages_scanned", num(*pages_scanned)),
        ("full_scans", num(*full_scans)),
        ("general_profit", profit),
        ("ksm_zero_pages", pages(*ksm_zero_pages, ps)),
        ("stable_node_chains", num(*stable_node_chains)),
        ("stable_node_dups", num(*stable_node_dups)),
        ("pages_to_scan", num(*pages_to_scan)),
        ("sleep_millisecs", num(*sleep_millisecs)),
        ("max_page_sharing", num(*max_page_sharing)),
        ("merge_across_nodes", on_off(*merge_across_nodes)),
        ("use_zero_pages", on_off(*use_zero_pages)),
        (
            "stable_node_chains_prune_millisecs",
            num(*stable_node_chains_prune_millisecs),
        ),
        ("advisor_mode", num(*advisor_mode)),
        (
            "advisor_target_scan_time",
            num(advisor_target_scan_time.map(|s| format!("{s} s"))),
        ),
        (
            "advisor_max_cpu",
            num(advisor_max_cpu.map(|p| format!("{p}%"))),
        ),
        ("advisor_min_pages_to_scan", num(*advisor_min_pages_to_scan)),
        ("advisor_max_pages_to_scan", num(*advisor_max_pages_to_scan)),
        ("smart_scan", on_off(*smart_scan)),
    ];
    for (name, value) in rows {
        writeln!(out, "{name:<36} {value}")?;
    }
    Ok(())
}

impl HasExitStatus for KsmCliError {
    fn exit_status(&self) -> ExitStatus {
        match self {
            KsmCliError::Ksm(e) => e.exit_status(),
            KsmCliError::Json(_) | KsmCliError::Output(_) => ExitStatus::Failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: KsmCommand,
    }

    fn parse(args: &[&str]) -> Result<KsmCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("ksm").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn parses_subcommands() {
        assert!(matches!(
            parse(&["status", "--json", "--window-ms", "0"]).unwrap(),
            KsmCommand::Status {
                json: true,
                window_ms: 0
            }
        ));
        assert!(matches!(parse(&["enable"]).unwrap(), KsmCommand::Enable));
        assert!(matches!(
            parse(&["disable", "--unmerge"]).unwrap(),
            KsmCommand::Disable { unmerge: true }
        ));
        assert!(matches!(
            parse(&["apply", "/etc/ksmvm/ksm.toml"]).unwrap(),
            KsmCommand::Apply { .. }
        ));
    }

    #[test]
    fn tune_needs_a_knob_and_maps_all() {
        assert!(parse(&["tune"]).is_err());
        assert!(parse(&["tune", "--use-zero-pages", "maybe"]).is_err());
        let KsmCommand::Tune(args) = parse(&[
            "tune",
            "--pages-to-scan",
            "20000",
            "--sleep-ms",
            "10",
            "--advisor",
            "scan-time",
            "--advisor-target-scan-s",
            "60",
            "--use-zero-pages",
            "on",
            "--max-page-sharing",
            "512",
            "--merge-across-nodes",
            "off",
        ])
        .unwrap() else {
            panic!("not tune");
        };
        let t = KsmTuning::from(args);
        assert_eq!(
            t,
            KsmTuning {
                pages_to_scan: Some(20000),
                sleep_millisecs: Some(10),
                advisor_mode: Some(AdvisorMode::ScanTime),
                advisor_target_scan_time: Some(60),
                use_zero_pages: Some(true),
                max_page_sharing: Some(512),
                merge_across_nodes: Some(false),
                enabled: None,
            }
        );
        // Validation happens in ksm::KsmTuning and names the knob.
        assert!(t.validate().is_err());
    }

    #[test]
    fn status_table_and_json_on_real_host() {
        let ksm = Ksm::new();
        if !ksm.is_available() {
            return;
        }
        let mut out = Vec::new();
        run_with(
            &ksm,
            parse(&["status", "--window-ms", "0"]).unwrap(),
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("pages_sharing"), "{text}");

        let mut out = Vec::new();
        run_with(
            &ksm,
            parse(&["status", "--json", "--window-ms", "20"]).unwrap(),
            &mut out,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["counters"]["pages_sharing"].is_u64(), "{v}");
        assert!(v["settings"].is_object());
        assert!(v["page_size"].is_u64());
    }

    #[test]
    fn errors_name_the_cause() {
        let ksm = Ksm::with_roots("/nonexistent/ksm", "/proc");
        let err = run_with(&ksm, KsmCommand::Enable, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("CONFIG_KSM"), "{err}");
    }
}
