//! ksmvm-bench: the KSM density demo, benchmarks and density experiments
//! for ksmvm. See docs/benchmarks.md and docs/density.md.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ksmvm_bench::{boot, cancel, common, compare, demo, density, io, profile, table, tuning};

#[derive(Parser, Debug)]
#[command(
    name = "ksmvm-bench",
    version,
    about = "Demo, benchmarks and density experiments for ksmvm"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// KSM density demo: a few identical probe guests, KSM merges them, per-VM memory table.
    Demo(demo::DemoArgs),
    /// Density experiment: host memory vs number of guests, KSM on and off.
    Density(density::DensityArgs),
    /// Boot times (exec -> API socket, first serial byte, READY) and VMM overhead RSS.
    Boot(boot::BootArgs),
    /// The boot measurement for ksmvm and another VMM command, with ratios.
    Compare(compare::CompareArgs),
    /// KSM tuning sweep: time to 90 % of ideal savings vs ksmd CPU.
    KsmTuning(tuning::TuningArgs),
    /// virtio block and net throughput, and the device thread's CPU per GiB.
    Io(io::IoArgs),
    /// List the memory profiles.
    Profiles(common::VmmArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cancel::install() {
        eprintln!("ksmvm-bench: error: cannot install the Ctrl-C handler: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Density(a) => density::run(a),
        Command::Boot(a) => boot::run(a),
        Command::Compare(a) => compare::run(a),
        Command::KsmTuning(a) => tuning::run(a),
        Command::Io(a) => io::run(&a),
        Command::Profiles(a) => list_profiles(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<cancel::Interrupted>().is_some() => {
            eprintln!("ksmvm-bench: interrupted: guests stopped, KSM settings restored");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("ksmvm-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn list_profiles(a: &common::VmmArgs) -> anyhow::Result<()> {
    let profiles = a.profiles()?;
    let mut t = table::Table::new([
        "profile",
        "RAM",
        "shared",
        "unique",
        "zero",
        "image",
        "description",
    ]);
    for p in profiles.iter() {
        t.row([
            p.name.clone(),
            p.mem_mib.to_string(),
            profile::mib_text(p.shared_pages()),
            profile::mib_text(p.unique_pages()),
            profile::mib_text(p.zero_pages()),
            p.image
                .as_ref()
                .map_or("-".into(), |i| i.display().to_string()),
            p.description.clone(),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}
