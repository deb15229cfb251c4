//! `ksmvm run`: resolve the instance (file + flags), build the VM and run
//! it under the systemd supervisor (which is silent outside systemd).

use std::process::ExitCode;
use std::time::Duration;

use super::{report_error, RunArgs};
use crate::instance::{self, Instance, InstanceFile};
use crate::outcome::{ExitOutcome, ExitStatus, HasExitStatus};
use crate::service::SystemdSupervisor;

/// The host's vCPU limit for validation; the MP table's when KVM cannot be
/// asked (the builder checks KVM's own limit again).
pub fn host_max_vcpus() -> u32 {
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => crate::builder::max_vcpus(&kvm),
        Err(_) => crate::arch::x86_64::mptable::MAX_CPUS,
    }
}

/// Reads the instance file (if any) and applies the flags over it.
pub fn resolve(args: &RunArgs, max_vcpus: u32) -> Result<Instance, instance::InstanceError> {
    let file = args.config.as_deref().map(InstanceFile::load).transpose()?;
    instance::resolve(file.as_ref(), args.to_settings(), max_vcpus)
}

pub fn run_vm(args: &RunArgs) -> ExitCode {
    let inst = match resolve(args, host_max_vcpus()) {
        Ok(i) => i,
        Err(e) => {
            report_error(&e);
            return ExitStatus::BadInput.into();
        }
    };
    let stop_watchdog = args.debug_stop_watchdog_after_s.map(Duration::from_secs);
    let mut sup = match SystemdSupervisor::new(&inst.service, stop_watchdog) {
        Ok(s) => s,
        Err(e) => {
            report_error(&format!("cannot set up service notifications: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let sink = inst.vm.serial.clone();
    let name = inst.vm.name.clone();
    let vm = match crate::builder::build_with(inst.vm, |out| sup.serial_tap(&sink, out)) {
        Ok(vm) => vm,
        Err(e) => {
            report_error(&e);
            return e.exit_status().into();
        }
    };
    // After the build, which validated the name that names the socket.
    let socket = match crate::api::ApiSocket::bind(&inst.api_sock, &name) {
        Ok(s) => s,
        Err(e) => {
            report_error(&e);
            return ExitCode::FAILURE;
        }
    };
    let running = match vm.start() {
        Ok(r) => r,
        Err(e) => {
            report_error(&e);
            return ExitCode::FAILURE;
        }
    };
    // The guest boots first; clients that connect meanwhile wait in the
    // socket's backlog. Started after `Vm::start` blocked the stop signals,
    // so the server's threads inherit the mask; dropped after the main loop
    // has joined the vCPUs.
    let _api = match crate::api::ApiServer::start(socket, running.handle()) {
        Ok(server) => server,
        Err(e) => {
            running.abort("the API server failed");
            report_error(&format!("cannot start the API server: {e}"));
            return ExitCode::FAILURE;
        }
    };
    crate::milestone!("API serving");
    match running.wait(inst.service.shutdown_timeout, &mut sup) {
        Ok(outcome) => report_outcome(&outcome).into(),
        Err(e) => {
            report_error(&e);
            ExitCode::FAILURE
        }
    }
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
