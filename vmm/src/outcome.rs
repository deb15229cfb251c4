//! How a VM ended ([`ExitOutcome`]) and what the VMM's process returns
//! for it ([`ExitStatus`]): the one mapping from outcomes and errors to
//! exit statuses.

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitOutcome {
    /// The guest powered off (ACPI S5, KVM_SYSTEM_EVENT_SHUTDOWN).
    GuestPowerOff,
    /// The guest reset, i.e. rebooted (i8042 reset command, ACPI reset
    /// register, KVM_SYSTEM_EVENT_RESET).
    GuestReset,
    /// The guest kernel panicked (pvpanic, KVM_SYSTEM_EVENT_CRASH).
    GuestPanic,
    /// The host asked the VMM to stop (signal or API).
    Stopped(String),
    TripleFault {
        vcpu: u32,
        rip: Option<u64>,
    },
    InternalError {
        vcpu: u32,
        suberror: u32,
        rip: Option<u64>,
        insn: Vec<u8>,
    },
    FailEntry {
        vcpu: u32,
        reason: u64,
    },
    Unexpected {
        vcpu: u32,
        what: String,
    },
}

/// The VMM's exit statuses (README "Running a guest", docs/systemd.md).
/// Every command returns one of these; errors say which through
/// [`HasExitStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitStatus {
    /// The guest powered off, or the host stopped the VM.
    Success = 0,
    /// A VMM or host failure, or a guest fault (triple fault, emulation failure).
    Failure = 1,
    /// Bad input: the configuration, a missing kernel or disk, a flag.
    BadInput = 2,
    /// The guest rebooted: a supervisor should start it again.
    GuestReset = 3,
    /// The guest kernel panicked.
    GuestPanic = 4,
}

impl ExitStatus {
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(s: ExitStatus) -> Self {
        std::process::ExitCode::from(s.code())
    }
}

/// An error that knows whose fault it is: the user's input
/// ([`ExitStatus::BadInput`]) or the host's ([`ExitStatus::Failure`]).
pub trait HasExitStatus {
    fn exit_status(&self) -> ExitStatus;
}

impl ExitOutcome {
    /// The VMM's exit status for this outcome.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            ExitOutcome::GuestPowerOff | ExitOutcome::Stopped(_) => ExitStatus::Success,
            ExitOutcome::GuestReset => ExitStatus::GuestReset,
            ExitOutcome::GuestPanic => ExitStatus::GuestPanic,
            ExitOutcome::TripleFault { .. }
            | ExitOutcome::InternalError { .. }
            | ExitOutcome::FailEntry { .. }
            | ExitOutcome::Unexpected { .. } => ExitStatus::Failure,
        }
    }
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt_rip(rip: &Option<u64>) -> String {
    rip.map_or_else(|| "unknown".into(), |r| format!("{r:#x}"))
}

impl std::fmt::Display for ExitOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitOutcome::GuestPowerOff => write!(f, "the guest powered off"),
            ExitOutcome::GuestReset => write!(f, "the guest reset (reboot)"),
            ExitOutcome::GuestPanic => write!(f, "the guest kernel panicked"),
            ExitOutcome::Stopped(why) => write!(f, "stopped: {why}"),
            ExitOutcome::TripleFault { vcpu, rip } => write!(
                f,
                "guest triple fault on vCPU {vcpu} (KVM_EXIT_SHUTDOWN) at RIP {}",
                fmt_rip(rip)
            ),
            ExitOutcome::InternalError {
                vcpu,
                suberror,
                rip,
                insn,
            } => write!(
                f,
                "KVM_EXIT_INTERNAL_ERROR on vCPU {vcpu}: suberror {suberror} ({}), RIP {}, instruction bytes [{}]",
                suberror_name(*suberror),
                fmt_rip(rip),
                if insn.is_empty() { "unreadable".into() } else { hex_bytes(insn) }
            ),
            ExitOutcome::FailEntry { vcpu, reason } => write!(
                f,
                "KVM_EXIT_FAIL_ENTRY on vCPU {vcpu}: hardware entry failure reason {reason:#x}"
            ),
            ExitOutcome::Unexpected { vcpu, what } => {
                write!(f, "unsupported vCPU exit on vCPU {vcpu}: {what}")
            }
        }
    }
}

fn suberror_name(s: u32) -> &'static str {
    match s {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "event delivery failure",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_one_mapping() {
        use ExitStatus::*;
        let cases = [
            (ExitOutcome::GuestPowerOff, Success),
            (ExitOutcome::Stopped("SIGTERM".into()), Success),
            (ExitOutcome::GuestReset, GuestReset),
            (ExitOutcome::GuestPanic, GuestPanic),
            (ExitOutcome::TripleFault { vcpu: 0, rip: None }, Failure),
        ];
        for (outcome, status) in cases {
            assert_eq!(outcome.exit_status(), status, "{outcome}");
        }
        // The documented numbers (README, docs/systemd.md).
        assert_eq!(
            [Success, Failure, BadInput, GuestReset, GuestPanic].map(ExitStatus::code),
            [0, 1, 2, 3, 4]
        );
    }
}
