//! `ksmvm-testhost`: runs a command, or a whole test binary test by test, in
//! fresh test hosts (see README.md). `make test-linux` uses `suite`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ksmvm_testhost::{Config, Error, Image, Job, Run, TestHost, FAULT_MARKER};

#[derive(Parser)]
#[command(
    name = "ksmvm-testhost",
    about = "Run commands in the hardware-virtualised test host"
)]
struct Cli {
    /// Test-host memory in MiB.
    #[arg(long, default_value_t = 6144, global = true)]
    mem_mib: u32,
    /// Test-host CPUs.
    #[arg(long, default_value_t = 2, global = true)]
    smp: u32,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", global = true)]
    qemu: PathBuf,
    /// The test host's image folder (default: run tests/testhost/prepare.sh).
    #[arg(long, global = true)]
    image: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one command in a fresh test host; exits with its status.
    Run {
        /// Seconds the whole run may take.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        #[arg(required = true, trailing_var_arg = true)]
        argv: Vec<String>,
    },
    /// Run each test of a libtest binary in its own fresh test host (or
    /// directly, on a host with vmx/svm), retrying once only after a
    /// test-host fault; prints per-test times and "N passed, N failed".
    Suite {
        /// Seconds one test (with its test host) may take: a guard against
        /// a wedged test host, well above the slowest test (three systemd
        /// guests booted one after another, ~10 min under emulation).
        #[arg(long, default_value_t = 1500)]
        test_timeout: u64,
        /// Where the console and guest logs of failed tests are kept.
        #[arg(long, default_value = "target/testhost-artefacts")]
        artefacts: PathBuf,
        /// Only tests whose name contains this (or one of these, comma-separated).
        #[arg(long)]
        filter: Option<String>,
        /// Run the tests on this host, without QEMU (the default where
        /// /proc/cpuinfo has vmx or svm).
        #[arg(long)]
        direct: bool,
        /// The test binary, then arguments for it.
        #[arg(required = true, trailing_var_arg = true)]
        test_bin: Vec<String>,
    },
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn image(cli: &Cli) -> Result<Image, Error> {
    match &cli.image {
        Some(dir) => Image::at(dir),
        None => Image::prepare(&repo_root()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ksmvm_testhost::catch_interrupts();
    let res = match &cli.cmd {
        Cmd::Run { timeout, argv } => run_one(&cli, *timeout, argv),
        Cmd::Suite {
            test_timeout,
            artefacts,
            filter,
            direct,
            test_bin,
        } => suite(
            &cli,
            Duration::from_secs(*test_timeout),
            artefacts,
            filter.as_deref(),
            *direct || ksmvm_testhost::host_has_hw_virt(),
            test_bin,
        ),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ksmvm-testhost: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn config(cli: &Cli, timeout: Duration) -> Config {
    Config {
        qemu: cli.qemu.clone(),
        mem_mib: cli.mem_mib,
        smp: cli.smp,
        timeout,
    }
}

fn run_one(cli: &Cli, timeout: u64, argv: &[String]) -> Result<ExitCode, Error> {
    let image = image(cli)?;
    let cfg = config(cli, Duration::from_secs(timeout));
    let run = TestHost::run(
        &image,
        &cfg,
        &Job::here(argv.to_vec()),
        &mut std::io::stdout(),
    )?;
    report_warnings(&run);
    match run.result {
        Ok(rc) => {
            run.discard();
            Ok(ExitCode::from(u8::try_from(rc).unwrap_or(1)))
        }
        Err(f) => {
            eprintln!(
                "ksmvm-testhost: {f}; console log: {}",
                run.console.display()
            );
            print_tail(&run.console, 30);
            Ok(ExitCode::from(1))
        }
    }
}

fn report_warnings(run: &Run) {
    for w in &run.warnings {
        eprintln!("ksmvm-testhost: test-host console: {w}");
    }
}

fn print_tail(path: &Path, n: usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    eprintln!("--- last {n} lines of {} ---", path.display());
    for l in &lines[lines.len().saturating_sub(n)..] {
        eprintln!("{l}");
    }
    eprintln!("---");
}

/// The test names a libtest binary lists.
fn list_tests(bin: &str, filter: Option<&str>) -> Result<Vec<String>, Error> {
    let out = Command::new(bin)
        .args(["--list", "--format", "terse"])
        .output()
        .map_err(|source| Error::Spawn {
            what: bin.to_string(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|n| filter.is_none_or(|f| f.split(',').any(|f| n.contains(f))))
        .map(str::to_owned)
        .collect())
}

/// Keeps a failed run's scratch folder (console log, output, guest logs).
fn keep(run: &Run, artefacts: &Path, name: &str) -> PathBuf {
    let dest = artefacts.join(name);
    let _ = std::fs::create_dir_all(artefacts);
    let _ = std::fs::remove_dir_all(&dest);
    if std::fs::rename(&run.scratch, &dest).is_err() {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(&run.scratch)
            .arg(&dest)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return run.scratch.clone();
        }
        run.discard();
    }
    dest
}

enum Verdict {
    Passed,
    Failed,
}

fn suite(
    cli: &Cli,
    test_timeout: Duration,
    artefacts: &Path,
    filter: Option<&str>,
    direct: bool,
    test_bin: &[String],
) -> Result<ExitCode, Error> {
    let (bin, extra) = test_bin
        .split_first()
        .expect("clap requires the test binary");
    let tests = list_tests(bin, filter)?;
    if tests.is_empty() {
        eprintln!("ksmvm-testhost: {bin} lists no test");
        return Ok(ExitCode::from(1));
    }
    let image = if direct { None } else { Some(image(cli)?) };
    let lane = if direct {
        "directly on this host (vmx/svm)"
    } else {
        "each in a fresh test host"
    };
    println!("running {} tests {lane}", tests.len());
    let start = Instant::now();
    let (mut passed, mut failed, mut retries) = (0, 0, 0);
    let mut times = Vec::new();
    for name in &tests {
        let argv: Vec<String> = [bin.clone(), "--exact".into(), name.clone()]
            .into_iter()
            .chain(["--nocapture".into(), "--test-threads=1".into()])
            .chain(extra.iter().cloned())
            .collect();
        let t0 = Instant::now();
        println!("\n=== {name}");
        let verdict = match &image {
            None => direct_run(&argv),
            Some(image) => {
                let cfg = config(cli, test_timeout);
                let job = Job::here(argv);
                let mut verdict = Verdict::Failed;
                for attempt in 1..=2 {
                    let run = TestHost::run(image, &cfg, &job, &mut std::io::stdout())?;
                    report_warnings(&run);
                    match &run.result {
                        Ok(0) => {
                            run.discard();
                            verdict = Verdict::Passed;
                        }
                        Ok(rc) => {
                            let marker = run.scratch.join("artefacts").join(FAULT_MARKER);
                            let fault = std::fs::read_to_string(&marker).ok();
                            let dir = match fault {
                                Some(_) => format!("{name}.try{attempt}"),
                                None => name.clone(),
                            };
                            let kept = keep(&run, artefacts, &dir);
                            println!("{name}: exit status {rc}; logs kept in {}", kept.display());
                            if let (Some(why), 1) = (fault, attempt) {
                                retries += 1;
                                println!(
                                    "{name}: TEST-HOST FAULT reported by the test: {}; RETRY on a fresh test host",
                                    why.trim()
                                );
                                continue;
                            }
                        }
                        Err(fault) => {
                            print_tail(&run.console, 30);
                            let kept = keep(&run, artefacts, &format!("{name}.try{attempt}"));
                            println!(
                                "{name}: TEST-HOST FAULT: {fault}; logs kept in {}",
                                kept.display()
                            );
                            if attempt == 1 {
                                retries += 1;
                                println!("{name}: RETRY on a fresh test host (a documented test-host fault, not a ksmvm error)");
                                continue;
                            }
                        }
                    }
                    break;
                }
                verdict
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        match verdict {
            Verdict::Passed => {
                passed += 1;
                times.push(format!("ok     {secs:7.1} s  {name}"));
            }
            Verdict::Failed => {
                failed += 1;
                times.push(format!("FAILED {secs:7.1} s  {name}"));
            }
        }
    }
    println!("\nper-test times:");
    for t in &times {
        println!("  {t}");
    }
    println!(
        "total {:.1} s, {retries} retr{} after test-host faults",
        start.elapsed().as_secs_f64(),
        if retries == 1 { "y" } else { "ies" }
    );
    println!("{passed} passed, {failed} failed");
    let _ = std::io::stdout().flush();
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn direct_run(argv: &[String]) -> Verdict {
    match Command::new(&argv[0]).args(&argv[1..]).status() {
        Ok(s) if s.success() => Verdict::Passed,
        Ok(_) => Verdict::Failed,
        Err(e) => {
            eprintln!("cannot run {}: {e}", argv[0]);
            Verdict::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_tests_of_a_libtest_binary() {
        // This very test binary is one.
        let me = std::env::current_exe().unwrap();
        let all = list_tests(me.to_str().unwrap(), None).unwrap();
        assert!(
            all.iter()
                .any(|t| t.ends_with("lists_the_tests_of_a_libtest_binary")),
            "{all:?}"
        );
        let none = list_tests(me.to_str().unwrap(), Some("no-such-test")).unwrap();
        assert!(none.is_empty());
    }
}
