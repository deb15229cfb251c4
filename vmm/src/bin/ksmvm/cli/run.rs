//! `ksmvm run`: resolve the instance (file + flags), build the VM and run
//! it under the systemd supervisor (which is silent outside systemd).

use std::process::ExitCode;
use std::time::Duration;

use super::{fail, report_error, RunArgs};
use ksmvm::config::{self, HostLimits, Instance, InstanceFile};
use ksmvm::outcome::{ExitOutcome, ExitStatus};
use ksmvm::service::SystemdSupervisor;

/// Reads the instance file (if any) and applies the flags over it.
pub fn resolve(args: &RunArgs, host: &HostLimits) -> Result<Instance, config::InstanceError> {
    let file = args.config.as_deref().map(InstanceFile::load).transpose()?;
    config::resolve(file.as_ref(), args.settings.clone(), host)
}

pub fn run_vm(args: &RunArgs) -> ExitCode {
    let inst = match resolve(args, &HostLimits::probe()) {
        Ok(i) => i,
        Err(e) => return fail(&e),
    };
    if let Err(e) = start_seccomp(&inst) {
        return fail(&e);
    }
    let stop_watchdog = args.debug_stop_watchdog_after_s.map(Duration::from_secs);
    let mut sup = match SystemdSupervisor::new(&inst.service, stop_watchdog) {
        Ok(s) => s,
        Err(e) => {
            report_error(&format!("cannot set up service notifications: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let name = inst.vm.name.clone();
    let vm = match ksmvm::builder::build_with(inst.vm, |out| sup.serial_tap(out)) {
        Ok(vm) => vm,
        Err(e) => return fail(&e),
    };
    // After the build, which validated the name that names the socket.
    let socket = match ksmvm::api::ApiSocket::bind(&inst.api_sock, &name) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let running = match vm.start() {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    // The guest boots first; clients that connect meanwhile wait in the
    // socket's backlog. Started after `Vm::start` blocked the stop signals,
    // so the server's threads inherit the mask; dropped after the main loop
    // has joined the vCPUs.
    let _api = match ksmvm::api::ApiServer::start(socket, running.handle()) {
        Ok(server) => server,
        Err(e) => {
            running.abort("the API server failed");
            report_error(&format!("cannot start the API server: {e}"));
            return ExitCode::FAILURE;
        }
    };
    ksmvm::milestone!("API serving");
    // Every other thread runs now; the main thread's filter would bind
    // any it started later (the kernel stacks filters).
    if let Err(e) = ksmvm::seccomp::enter_main() {
        running.abort("the main thread's seccomp filter failed");
        return fail(&e);
    }
    match running.wait(inst.service.shutdown_timeout, &mut sup) {
        Ok(outcome) => report_outcome(&outcome).into(),
        Err(e) => fail(&e),
    }
}

/// Compiles the threads' filters before the first thread starts; `off`
/// and `log` are said at start, since they leave a guest that escapes
/// into a VMM thread the whole host.
fn start_seccomp(inst: &Instance) -> Result<(), ksmvm::seccomp::SeccompError> {
    use ksmvm::config::{SeccompMode, SerialSink};
    match inst.seccomp {
        SeccompMode::On => {}
        SeccompMode::Log => log::warn!(
            "seccomp = log: forbidden system calls are only logged by the kernel (dmesg), not stopped"
        ),
        SeccompMode::Off => log::warn!("seccomp = off: the VMM's threads run without system-call filters"),
    }
    let ctx = ksmvm::seccomp::Context {
        serial_file: matches!(inst.vm.serial, SerialSink::File(_)),
    };
    ksmvm::seccomp::init(inst.seccomp, &ctx)
}

/// Logs how the VM ended and returns the VMM's exit status for it
/// (`ExitOutcome::exit_status`: 0 power-off or host stop, 3 reboot,
/// 4 kernel panic, 1 guest fault).
fn report_outcome(outcome: &ExitOutcome) -> ExitStatus {
    let status = outcome.exit_status();
    match status {
        // A reboot is the guest's own wish: the supervisor starts it again.
        ExitStatus::Success | ExitStatus::GuestReset => log::info!("{outcome}"),
        ExitStatus::GuestPanic => log::error!("{outcome}"),
        _ => report_error(outcome),
    }
    status
}
