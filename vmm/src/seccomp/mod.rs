//! System-call filters by thread kind (docs/security.md).
//!
//! `ksmvm run` compiles one filter per kind of thread once, at start
//! ([`init`]), from the allow-lists in [`rules`]; each thread installs its
//! own before it handles guest or client input: every thread started by
//! [`crate::threads::spawn`] at its start, the main thread once the VM runs
//! ([`enter_main`]). The kernel stacks a thread's filter on the one it
//! inherited, so a thread started by a filtered thread can never do more
//! than its parent allows: the API's request pool inherits the API thread's
//! filter, and the main thread installs its own only after it has started
//! every other thread.
//!
//! A forbidden call traps (SECCOMP_RET_TRAP): [`sigsys`] writes which thread
//! made which call to stderr (the journal) and ends the VMM with status 1,
//! running nothing else, since such a thread is taken as compromised. A
//! kill from the kernel (SECCOMP_RET_KILL_PROCESS) would say neither.
//! With `--seccomp log` the kernel logs forbidden calls (dmesg, audit) and
//! lets them through.

mod rules;
mod sigsys;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use crate::config::SeccompMode;
use crate::threads::ThreadKind;
pub use rules::Context;

/// A set of threads that share one allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// The main thread's run loop: signals, the supervisor, the stop path.
    Main,
    Vcpu,
    VirtioDevices,
    BlockIo,
    /// The API server and its request pool.
    Api,
}

impl Filter {
    pub const ALL: [Filter; 5] = [
        Filter::Main,
        Filter::Vcpu,
        Filter::VirtioDevices,
        Filter::BlockIo,
        Filter::Api,
    ];

    /// The filter a thread of `kind` installs at its start: `None` for
    /// threads that inherit theirs (the API's pool) and for the exporter,
    /// which is not a VMM.
    pub fn for_thread(kind: ThreadKind) -> Option<Filter> {
        match kind {
            ThreadKind::Vcpu(_) => Some(Filter::Vcpu),
            ThreadKind::VirtioDevices => Some(Filter::VirtioDevices),
            ThreadKind::BlockIo => Some(Filter::BlockIo),
            ThreadKind::Api => Some(Filter::Api),
            ThreadKind::ApiWorker | ThreadKind::Exporter | ThreadKind::ExporterWorker => None,
        }
    }

    /// How `KSMVM_DEBUG_SECCOMP_VIOLATE` names it.
    pub fn name(self) -> &'static str {
        match self {
            Filter::Main => "main",
            Filter::Vcpu => "vcpu",
            Filter::VirtioDevices => "virtio-devices",
            Filter::BlockIo => "virtio-blk-io",
            Filter::Api => "api",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0:?} thread filter: {1}")]
    Build(Filter, seccompiler::BackendError),
    #[error("cannot compile the {0:?} thread filter: {1}")]
    Compile(Filter, seccompiler::BackendError),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(nix::Error),
    #[error("cannot install the {0:?} thread filter: {1}")]
    Install(Filter, seccompiler::Error),
    #[error("seccomp is already set up in this process")]
    AlreadySet,
}

impl crate::outcome::HasExitStatus for SeccompError {
    fn exit_status(&self) -> crate::outcome::ExitStatus {
        crate::outcome::ExitStatus::Failure
    }
}

/// The compiled filters of this process.
struct Policy {
    filters: HashMap<Filter, BpfProgram>,
    /// Debug builds: the filter whose threads make a forbidden call right
    /// after installing it (`KSMVM_DEBUG_SECCOMP_VIOLATE`), for the tests.
    violate: Option<Filter>,
    /// Debug builds: `KSMVM_DEBUG_SECCOMP_CHURN` is set.
    churn: bool,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// The debug-only switch that makes one kind of thread break its filter.
pub const VIOLATE_ENV: &str = "KSMVM_DEBUG_SECCOMP_VIOLATE";
/// The debug-only switch that makes every thread, once filtered, grow its
/// heap and give it back (see [`one_malloc_arena`]).
pub const CHURN_ENV: &str = "KSMVM_DEBUG_SECCOMP_CHURN";

/// Compiles every thread kind's filter for `mode` and installs the SIGSYS
/// handler. Without it (`off`, or another command than `run`), threads
/// run unfiltered. Call it before the process starts any thread.
pub fn init(mode: SeccompMode, ctx: &Context) -> Result<(), SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::On => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    one_malloc_arena();
    let filters = compile_all(ctx, mismatch)?;
    if mode == SeccompMode::On {
        sigsys::install().map_err(SeccompError::Handler)?;
    }
    let violate = if cfg!(debug_assertions) {
        std::env::var(VIOLATE_ENV)
            .ok()
            .and_then(|v| Filter::ALL.into_iter().find(|f| f.name() == v))
    } else {
        None
    };
    let churn = cfg!(debug_assertions) && std::env::var_os(CHURN_ENV).is_some();
    POLICY
        .set(Policy {
            filters,
            violate,
            churn,
        })
        .map_err(|_| SeccompError::AlreadySet)
}

/// Every filter, compiled; `mismatch` is what a call outside the
/// allow-list gets.
pub(crate) fn compile_all(
    ctx: &Context,
    mismatch: SeccompAction,
) -> Result<HashMap<Filter, BpfProgram>, SeccompError> {
    let mut filters = HashMap::new();
    for f in Filter::ALL {
        let rules = rules::allowed(f, ctx).map_err(|e| SeccompError::Build(f, e))?;
        let filter = SeccompFilter::new(
            rules,
            mismatch.clone(),
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(|e| SeccompError::Build(f, e))?;
        let bpf: BpfProgram = filter.try_into().map_err(|e| SeccompError::Compile(f, e))?;
        filters.insert(f, bpf);
    }
    Ok(filters)
}

/// Installs `filter` on the calling thread (nothing without [`init`]).
pub fn enter(filter: Filter, thread: &str) -> Result<(), SeccompError> {
    let Some(policy) = POLICY.get() else {
        return Ok(());
    };
    let Some(bpf) = policy.filters.get(&filter) else {
        return Ok(());
    };
    sigsys::set_thread_name(thread);
    seccompiler::apply_filter(bpf).map_err(|e| SeccompError::Install(filter, e))?;
    if policy.violate == Some(filter) {
        violate();
    }
    if policy.churn {
        churn_heap();
    }
    Ok(())
}

/// 8 MiB in 64 KiB blocks (below glibc's mmap threshold, so from the
/// thread's arena), allocated and freed four times: what makes a thread
/// arena shrink.
fn churn_heap() {
    for round in 0..4u8 {
        let blocks: Vec<Vec<u8>> = (0..128).map(|_| vec![round; 64 << 10]).collect();
        drop(std::hint::black_box(blocks));
    }
}

/// The main thread's filter: called once every other thread runs.
pub fn enter_main() -> Result<(), SeccompError> {
    enter(Filter::Main, "main")
}

/// Installs the filter of a thread of `kind` at its start; a thread that
/// cannot must not go on unfiltered, so the VMM ends.
pub(crate) fn enter_thread(kind: ThreadKind) {
    let Some(filter) = Filter::for_thread(kind) else {
        return;
    };
    if let Err(e) = enter(filter, &kind.name()) {
        log::error!("thread {}: {e}; the VMM stops", kind.name());
        std::process::exit(crate::outcome::ExitStatus::Failure.code().into());
    }
}

/// Keeps every thread's allocations in glibc's main arena. A thread arena
/// that shrinks makes glibc open /proc/sys/vm/overcommit_memory (once per
/// process, whichever thread frees first), a call no VMM thread may make:
/// a disk's I/O thread freeing its buffers at the end of a Linux guest's
/// shutdown was ended that way. The main arena shrinks with brk(2) instead.
/// Small allocations still come from each thread's own cache without a
/// lock; an idle probe VMM's anonymous memory is the same either way
/// (Pss_Anon 1288-1312 KiB).
pub(crate) fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; before any thread
    // starts, no allocation races with it.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        log::warn!("cannot limit glibc's malloc to one arena");
    }
}

/// A call no filter allows (`personality(0xffffffff)` only reads the
/// persona, so it is harmless where no filter stops it).
fn violate() {
    log::warn!("{VIOLATE_ENV}: making a forbidden system call");
    // SAFETY: personality with 0xffffffff queries the persona and changes
    // nothing; no memory is passed.
    unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
}
