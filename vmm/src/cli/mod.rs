//! The thin `ksmvm` command line: parses arguments, builds what was asked
//! for and maps errors to exit statuses (2 = bad input, 1 = failure).

pub mod ksm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

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

fn run_vm(args: &RunArgs) -> ExitCode {
    let vm = match crate::builder::build(args.to_config()) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("ksmvm: error: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    match vm.run() {
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
    }
}
