//! The VMM's threads by kind, and the one place that starts them.
//!
//! Each kind handles different input (a vCPU: guest exits; the device loop:
//! guest rings and TAP frames; the API: client requests), so each will get
//! its own seccomp filter (docs/architecture.md). Every thread the VMM
//! starts is spawned by [`spawn`], or, for the HTTP server's tokio pool,
//! named by [`ThreadKind::name`]: nothing else in the crate calls
//! `std::thread::Builder`.

use std::io;
use std::thread::JoinHandle;

/// What a VMM thread does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU (KVM_RUN and the exits it returns).
    Vcpu(u32),
    /// Runs every virtio device's queues and event sources.
    VirtioDevices,
    /// Runs one disk's reads, writes and flushes against its image (the
    /// device loop parses requests and hands them over).
    BlockIo,
    /// The control API's HTTP server (its tokio runtime).
    Api,
    /// The API's blocking pool: one request's handler (sampling, madvise).
    ApiWorker,
    /// The Prometheus exporter's HTTP server (`ksmvm exporter`).
    Exporter,
    /// The exporter's blocking pool.
    ExporterWorker,
}

impl ThreadKind {
    /// The thread's name as /proc/PID/task/TID/comm shows it (at most 15
    /// bytes; longer names are cut by the kernel).
    pub fn name(&self) -> String {
        match self {
            ThreadKind::Vcpu(i) => format!("vcpu{i}"),
            ThreadKind::VirtioDevices => "virtio-devices".into(),
            ThreadKind::BlockIo => "virtio-blk-io".into(),
            ThreadKind::Api => "api".into(),
            ThreadKind::ApiWorker => "api-worker".into(),
            ThreadKind::Exporter => "exporter".into(),
            ThreadKind::ExporterWorker => "exporter-worker".into(),
        }
    }

    /// The kind of the pool threads serving requests for this server kind.
    pub fn worker(&self) -> ThreadKind {
        match self {
            ThreadKind::Exporter | ThreadKind::ExporterWorker => ThreadKind::ExporterWorker,
            _ => ThreadKind::ApiWorker,
        }
    }
}

/// SIGINT and SIGTERM belong to the main loop's signalfd. A thread that
/// did not block them would take their default action (ending the VMM
/// without a flush) whenever the kernel picked it, so every thread blocks
/// them itself, whenever it was started (a disk's I/O thread starts before
/// the main thread's mask is set).
fn block_stop_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    if let Err(e) = sigs.thread_block() {
        log::warn!("cannot block SIGINT/SIGTERM in a VMM thread: {e}");
    }
}

/// Starts `f` on a new thread of `kind`, with SIGINT/SIGTERM blocked.
pub fn spawn<T, F>(kind: ThreadKind, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name(kind.name())
        .spawn(move || {
            block_stop_signals();
            log::debug!("thread {} started", kind.name());
            crate::seccomp::enter_thread(kind);
            f()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_comm_and_differ() {
        let kinds = [
            ThreadKind::Vcpu(0),
            ThreadKind::Vcpu(254),
            ThreadKind::VirtioDevices,
            ThreadKind::BlockIo,
            ThreadKind::Api,
            ThreadKind::ApiWorker,
            ThreadKind::Exporter,
            ThreadKind::ExporterWorker,
        ];
        let names: Vec<String> = kinds.iter().map(ThreadKind::name).collect();
        for n in &names {
            assert!(n.len() <= 15, "{n} is longer than comm allows");
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn spawned_threads_carry_their_kind_name() {
        let name = spawn(ThreadKind::VirtioDevices, || {
            std::thread::current().name().map(str::to_owned)
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(name.as_deref(), Some("virtio-devices"));
    }

    #[test]
    fn spawned_threads_block_the_stop_signals() {
        let blocked = spawn(ThreadKind::BlockIo, || {
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
            u64::from_str_radix(line["SigBlk:".len()..].trim(), 16).unwrap()
        })
        .unwrap()
        .join()
        .unwrap();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            assert_ne!(blocked & 1 << (sig - 1), 0, "signal {sig} not blocked");
        }
    }
}
