//! The thin `ksmvm` command line: parses arguments, builds what was asked
//! for and maps errors to exit statuses (2 = bad input, 1 = failure).

pub mod config;
pub mod ksm;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::SerialSink;
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
    Run(RunArgs),
    /// Inspect and tune the host's KSM.
    #[command(subcommand)]
    Ksm(ksm::KsmCommand),
    /// Work with instance files.
    #[command(subcommand)]
    Config(config::ConfigCommand),
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
    #[arg(long, value_parser = parse_on_off)]
    pub ksm: Option<bool>,
    /// VM name (used for the API socket and in statistics) [default: the
    /// instance file's name, else "vm"].
    #[arg(long)]
    pub name: Option<String>,
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
    }
}
