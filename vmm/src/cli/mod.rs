//! The thin `ksmvm` command line: parses arguments and dispatches.

pub mod ksm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ksmvm", version, about = "A KSM-aware microVM monitor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect and tune the host's KSM.
    #[command(subcommand)]
    Ksm(ksm::KsmCommand),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ksm(cmd) => ksm::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ksmvm: {e}");
            ExitCode::FAILURE
        }
    }
}
