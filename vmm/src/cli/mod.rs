//! The thin `ksmvm` command line: parses arguments and dispatches.

use std::process::ExitCode;

pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
