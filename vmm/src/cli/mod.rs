//! The thin `ksmvm` command line: parses arguments, builds what was asked
//! for and maps errors to exit statuses (2 = bad input, 1 = failure).

mod error;
mod exporter;
mod fleet;
mod format;
pub mod ksm;
mod list;
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
use crate::config::{SerialSink, VmConfig};

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
    Run(RunArgs),
    /// Inspect and tune the host's KSM.
    #[command(subcommand)]
    Ksm(ksm::KsmCommand),
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

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage with a 64-bit entry point.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (default: serial console, reboot via i8042).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest serial output: stdout, file:PATH or none.
    #[arg(long, default_value = "stdout")]
    pub serial: SerialSink,
    /// Mark guest memory MADV_MERGEABLE for KSM.
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub ksm: bool,
    /// VM name (used for the API socket and in statistics).
    #[arg(long, default_value = "vm")]
    pub name: String,
    /// Control API socket (default: RUNTIME_DIR/NAME.sock, where RUNTIME_DIR
    /// is $KSMVM_RUNTIME_DIR or /run/ksmvm).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
}

pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

impl RunArgs {
    pub fn to_config(&self) -> VmConfig {
        VmConfig {
            name: self.name.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            serial: self.serial.clone(),
            ksm: self.ksm,
        }
    }
}

/// Binds the VM's API socket (the name was validated by the build).
fn bind_api(args: &RunArgs) -> Result<crate::api::ApiSocket, crate::api::SocketError> {
    let path = args
        .api_sock
        .clone()
        .unwrap_or_else(|| crate::api::socket_path(&args.name));
    crate::api::ApiSocket::bind(&path, &args.name)
}

fn run_vm(args: &RunArgs) -> ExitCode {
    let vm = match crate::builder::build(args.to_config()) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("ksmvm: error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let socket = match bind_api(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ksmvm: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match vm.run_with_api(Some(socket)) {
        Ok(outcome) if outcome.is_success() => {
            log::info!("{outcome}");
            ExitCode::SUCCESS
        }
        Ok(outcome) => {
            eprintln!("ksmvm: error: {outcome}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ksmvm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::logger::init(cli.log_level);
    match cli.command {
        Command::Run(args) => run_vm(&args),
        Command::Ksm(cmd) => match ksm::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ksmvm: error: {e}");
                ExitCode::FAILURE
            }
        },
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
            eprintln!("ksmvm: error: {e}");
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
