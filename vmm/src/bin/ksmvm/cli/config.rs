//! `ksmvm config check FILE`: validates an instance file without starting
//! anything (exit 0, or 2 with the error).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::fail;
use ksmvm::config::{self, HostLimits, InstanceFile, Settings};

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check an instance file: syntax, keys, values, and that the kernel and
    /// initrd exist.
    Check { file: PathBuf },
}

pub fn run(cmd: ConfigCommand) -> ExitCode {
    match cmd {
        ConfigCommand::Check { file } => {
            let checked = InstanceFile::load(&file)
                .and_then(|f| config::resolve(Some(&f), Settings::default(), &HostLimits::probe()));
            match checked {
                Ok(i) => {
                    println!(
                        "{}: ok (VM {}, {} MiB, {} vCPU(s))",
                        file.display(),
                        i.vm.name,
                        i.vm.mem_mib,
                        i.vm.vcpus
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
    }
}
