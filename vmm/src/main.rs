use std::process::ExitCode;

fn main() -> ExitCode {
    ksmvm::cli::main()
}
