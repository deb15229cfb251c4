//! The `ksmvm` command: the VMM (`ksmvm run`) and the host's tools around
//! it (KSM, instance files, the fleet views and the exporter), on the
//! `ksmvm` library.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
