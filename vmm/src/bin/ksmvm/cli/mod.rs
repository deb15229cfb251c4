//! The thin `ksmvm` command line: parses arguments, calls the library for
//! what was asked, and maps errors to exit statuses (`ExitStatus`:
//! 2 = bad input, 1 = failure).

mod config;
mod error;
mod exporter;
mod fleet;
mod format;
mod ksm;
mod list;
mod run;
mod stats;
mod top;

pub use error::CliError;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use ksmvm::config::Settings;
use ksmvm::instance::runtime_dir;
use ksmvm::outcome::HasExitStatus;

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
        /// Address to listen on (port 0: any free port). Loopback by default:
        /// the metrics name every VM and have no authentication; give e.g.
        /// 0.0.0.0:9464 or a private address only behind a firewall or a
        /// TLS proxy (docs/api/README.md).
        #[arg(long, default_value = exporter::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
    },
}

/// `ksmvm run`: the instance settings as flags (every one optional, so
/// that with `--config` exactly the flags given override the file; see
/// `ksmvm::config`).
#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Instance file (TOML, e.g. /etc/ksmvm/NAME.toml); flags override its values.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
    /// Fault injection: stop sending WATCHDOG=1 to systemd after N seconds.
    #[arg(
        long,
        hide = true,
        value_name = "N",
        env = "KSMVM_DEBUG_STOP_WATCHDOG_AFTER_S"
    )]
    pub debug_stop_watchdog_after_s: Option<u64>,
}

/// Prints a fatal error; with journald's priority prefix under systemd.
pub fn report_error(e: &dyn std::fmt::Display) {
    ksmvm::logger::fatal(&format!("ksmvm: error: {e}"));
}

/// Reports `e` and returns the exit status its type says it deserves.
pub fn fail(e: &(impl std::fmt::Display + HasExitStatus)) -> ExitCode {
    report_error(e);
    e.exit_status().into()
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    ksmvm::logger::init(cli.log_level);
    match cli.command {
        Command::Run(args) => run::run_vm(&args),
        Command::Ksm(cmd) => match ksm::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
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
        Err(e) => fail(&e),
    }
}

/// `--api-sock`, else RUNTIME_DIR/NAME.sock (the name becomes a file name,
/// so it is validated first).
fn stats_socket(name: &str, api_sock: Option<PathBuf>) -> Result<PathBuf, CliError> {
    match api_sock {
        Some(p) => Ok(p),
        None => {
            ksmvm::config::validate_name(name)?;
            Ok(ksmvm::instance::socket_path_in(&runtime_dir(), name))
        }
    }
}
