//! The thin `ksmvm` command line: parses arguments, builds what was asked
//! for and maps errors to exit statuses (2 = bad input, 1 = failure).

pub mod config;
mod error;
mod exporter;
mod fleet;
mod format;
pub mod ksm;
mod list;
mod run;
mod stats;
mod top;

pub use error::CliError;
pub use fleet::{discover, VmEntry, VmStatus};
pub use top::{build_frame, render_text, Frame};

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::runtime_dir;
use crate::config::SerialSink;
use crate::devices::virtio::{BalloonConfig, DiskConfig, NetConfig};
use crate::instance::{ReadyMode, Settings};

#[derive(Parser, Debug)]
#[command(name = "ksmvm", version, about = "A KSM-aware microVM monitor")]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "warn", env = "KSMVM_LOG")]
    pub log_level: log::LevelFilter,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest and run it until it powers off or is stopped.
    Run(Box<RunArgs>),
    /// Inspect and tune the host's KSM.
    #[command(subcommand)]
    Ksm(ksm::KsmCommand),
    /// Work with instance files (/etc/ksmvm/NAME.toml).
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// List the VMs of the runtime directory ($KSMVM_RUNTIME_DIR, default /run/ksmvm).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM's memory and KSM statistics.
    Stats {
        /// VM name (its socket is RUNTIME_DIR/NAME.sock).
        name: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        /// The VM's API socket, if not the default one.
        #[arg(long)]
        api_sock: Option<PathBuf>,
    },
    /// Live table of every VM with the host's KSM totals (q quits).
    Top {
        /// Print one plain-text frame and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// Refresh interval.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Serve Prometheus metrics of every VM and of the host's KSM over HTTP.
    Exporter {
        /// Address to listen on, e.g. 127.0.0.1:9810 (port 0: any free port).
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

/// `ksmvm run`: every flag is optional so that, with `--config`, exactly
/// the flags given override the file (see `instance`).
#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Instance file (TOML, e.g. /etc/ksmvm/NAME.toml); flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Guest kernel: an ELF vmlinux or a bzImage with a 64-bit entry point.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line [default: serial console, reboot via i8042].
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB [default: 256].
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Guest serial output: stdout, file:PATH or none [default: stdout].
    #[arg(long)]
    pub serial: Option<SerialSink>,
    /// Mark guest memory MADV_MERGEABLE for KSM: on or off [default: on].
    #[arg(long, value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub ksm: Option<bool>,
    /// VM name (used for the API socket and in statistics) [default: the
    /// instance file's name, else "vm"].
    #[arg(long)]
    pub name: Option<String>,
    /// Control API socket (default: RUNTIME_DIR/NAME.sock, where RUNTIME_DIR
    /// is $KSMVM_RUNTIME_DIR or /run/ksmvm).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// A virtio-blk disk: path=FILE[,ro=on][,id=NAME] (repeatable; replaces
    /// the instance file's disks).
    #[arg(long, value_name = "path=FILE[,ro=on][,id=NAME]")]
    pub disk: Vec<DiskConfig>,
    /// A virtio-net device on an existing TAP: tap=NAME[,mac=MAC]
    /// (repeatable; replaces the instance file's nets).
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    pub net: Vec<NetConfig>,
    /// A virtio balloon: [deflate-on-oom=on][,free-page-reporting=on][,stats-interval-s=N].
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "OPTIONS")]
    pub balloon: Option<BalloonConfig>,
    /// The virtio entropy device: on or off [default: on].
    #[arg(long, value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub rng: Option<bool>,
    /// Seconds a guest asked to shut down (SIGTERM) may take before the VM
    /// is stopped; 0 stops it at once [default: 0].
    #[arg(long, value_name = "SECONDS")]
    pub shutdown_timeout_s: Option<u64>,
    /// When to tell systemd the VM is ready: running (vCPUs started) or
    /// guest (the guest printed --ready-marker) [default: running].
    #[arg(long)]
    pub ready: Option<ReadyMode>,
    /// Serial output that means the guest is up (for --ready guest).
    #[arg(long, value_name = "TEXT")]
    pub ready_marker: Option<String>,
    /// Fault injection: stop sending WATCHDOG=1 to systemd after N seconds.
    #[arg(
        long,
        hide = true,
        value_name = "N",
        env = "KSMVM_DEBUG_STOP_WATCHDOG_AFTER_S"
    )]
    pub debug_stop_watchdog_after_s: Option<u64>,
}

pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

impl RunArgs {
    /// The values the flags give, as instance settings.
    pub fn to_settings(&self) -> Settings {
        Settings {
            name: self.name.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            ksm: self.ksm,
            serial: self.serial.clone(),
            api_sock: self.api_sock.clone(),
            disk: (!self.disk.is_empty()).then(|| self.disk.clone()),
            net: (!self.net.is_empty()).then(|| self.net.clone()),
            balloon: self.balloon.clone(),
            rng: self.rng,
            shutdown_timeout_s: self.shutdown_timeout_s,
            ready: self.ready,
            ready_marker: self.ready_marker.clone(),
        }
    }
}

/// Prints a fatal error; with journald's priority prefix under systemd.
pub fn report_error(e: &dyn std::fmt::Display) {
    crate::logger::fatal(&format!("ksmvm: error: {e}"));
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::logger::init(cli.log_level);
    match cli.command {
        Command::Run(args) => run::run_vm(&args),
        Command::Ksm(cmd) => match ksm::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                report_error(&e);
                ExitCode::FAILURE
            }
        },
        Command::Config(cmd) => config::run(cmd),
        Command::List { json } => report(list::run(&runtime_dir(), json, &mut stdout())),
        Command::Stats {
            name,
            json,
            api_sock,
        } => report(
            stats_socket(&name, api_sock)
                .and_then(|socket| stats::run(&socket, json, &mut stdout())),
        ),
        Command::Top { once, interval_ms } => report(top::run(
            &runtime_dir(),
            once,
            Duration::from_millis(interval_ms),
            &mut stdout(),
        )),
        Command::Exporter { listen } => report(exporter::run(listen, runtime_dir(), &mut stdout())),
    }
}

fn stdout() -> std::io::StdoutLock<'static> {
    std::io::stdout().lock()
}

fn report(r: Result<(), CliError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// `--api-sock`, else RUNTIME_DIR/NAME.sock (the name becomes a file name,
/// so it is validated first).
fn stats_socket(name: &str, api_sock: Option<PathBuf>) -> Result<PathBuf, CliError> {
    match api_sock {
        Some(p) => Ok(p),
        None => {
            crate::config::validate_name(name)?;
            Ok(crate::api::socket_path_in(&runtime_dir(), name))
        }
    }
}
