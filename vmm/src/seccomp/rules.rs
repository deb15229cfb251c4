//! What each kind of VMM thread may ask of the kernel, and with which
//! arguments where the argument says what the call does (ioctl requests,
//! madvise advice, executable mappings, thread creation, file creation).
//!
//! A call missing here shows up as a SIGSYS naming it: find the thread's
//! code path, and add the call to the smallest set that needs it, with a
//! note of why.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompRule,
};
use syscalls::Sysno;

use super::Filter;

/// What changes a filter beyond the thread's kind: the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The serial port writes a `file:` sink, which the vCPU thread rotates
    /// (rename, create, truncate).
    pub serial_file: bool,
}

pub(super) type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// A filter's allow-list under construction.
#[derive(Default)]
struct Allow {
    rules: Rules,
}

impl Allow {
    /// `calls` whatever their arguments.
    fn any(&mut self, calls: &[Sysno]) -> &mut Self {
        for c in calls {
            self.rules.insert(i64::from(c.id()), Vec::new());
        }
        self
    }

    /// `call` when argument `arg` (as 32 bits) passes `op` against `value`;
    /// several of these for one call are alternatives.
    fn when(
        &mut self,
        call: Sysno,
        arg: u8,
        op: Op,
        value: u64,
    ) -> Result<&mut Self, BackendError> {
        let cond = SeccompCondition::new(arg, Len::Dword, op, value)?;
        self.rules
            .entry(i64::from(call.id()))
            .or_default()
            .push(SeccompRule::new(vec![cond])?);
        Ok(self)
    }

    /// `call` when argument `arg` is one of `values`.
    fn one_of(&mut self, call: Sysno, arg: u8, values: &[u64]) -> Result<&mut Self, BackendError> {
        for v in values {
            self.when(call, arg, Op::Eq, *v)?;
        }
        Ok(self)
    }
}

/// `_IO`/`_IOR` numbers of the KVM ioctls the vCPU thread makes while it
/// runs (kvm-ioctls keeps its own private).
const KVMIO: u64 = 0xAE;
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
pub(super) const KVM_RUN: u64 = (KVMIO << 8) | 0x80;
pub(super) const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
pub(super) const KVM_GET_SREGS: u64 = ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());
/// `_IOWR`: a fault's report reads the instruction bytes at RIP.
pub(super) const KVM_TRANSLATE: u64 = (3 << 30)
    | ((std::mem::size_of::<kvm_bindings::kvm_translation>() as u64) << 16)
    | (KVMIO << 8)
    | 0x85;

/// Every thread: memory (never executable), waiting, its signal mask,
/// reading and writing the fds it already holds (eventfds, its log on
/// stderr), the clock, and ending.
fn common(a: &mut Allow) -> Result<(), BackendError> {
    a.any(&[
        Sysno::brk,
        Sysno::munmap,
        Sysno::mremap,
        Sysno::futex,
        Sysno::sched_yield,
        Sysno::nanosleep,
        Sysno::clock_nanosleep,
        Sysno::clock_gettime,
        Sysno::gettimeofday,
        Sysno::gettid,
        Sysno::getpid,
        // std's hash maps seed themselves per thread.
        Sysno::getrandom,
        Sysno::rt_sigprocmask,
        Sysno::rt_sigreturn,
        // A thread's end takes down its signal stack.
        Sysno::sigaltstack,
        Sysno::read,
        Sysno::write,
        Sysno::close,
        Sysno::restart_syscall,
        Sysno::exit,
        Sysno::exit_group,
    ]);
    let exec = arg(libc::PROT_EXEC);
    a.when(Sysno::mmap, 2, Op::MaskedEq(exec), 0)?;
    a.when(Sysno::mprotect, 2, Op::MaskedEq(exec), 0)?;
    // Closing an fd in a debug build first asks whether it is open.
    a.when(Sysno::fcntl, 1, Op::Eq, arg(libc::F_GETFD))?;
    // glibc's allocator and thread stacks give memory back this way.
    a.when(Sysno::madvise, 2, Op::Eq, arg(libc::MADV_DONTNEED))?;
    Ok(())
}

/// A C flag or constant as a filter compares it; none is negative, and
/// u64::MAX, which no argument equals, would only make a rule stricter.
fn arg(v: libc::c_int) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Threads that wait on an epoll set of their own.
fn event_loop(a: &mut Allow) {
    a.any(&[Sysno::epoll_wait, Sysno::epoll_pwait, Sysno::epoll_ctl]);
}

/// Rate limiters and deadlines (timerfds made at start).
fn timers(a: &mut Allow) {
    a.any(&[Sysno::timerfd_settime, Sysno::timerfd_gettime]);
}

/// Reading /proc/self/smaps, ksm_stat and the like through fds opened at
/// start, and mincore over guest RAM: the statistics.
fn stats(a: &mut Allow) {
    a.any(&[
        Sysno::lseek,
        Sysno::statx,
        Sysno::newfstatat,
        Sysno::fstat,
        Sysno::mincore,
        Sysno::pread64,
    ]);
}

/// Kicking vCPU threads out of KVM_RUN (pause, stop).
fn kick(a: &mut Allow) {
    a.any(&[Sysno::tgkill]);
}

pub(super) fn allowed(filter: Filter, ctx: &Context) -> Result<Rules, BackendError> {
    let mut a = Allow::default();
    common(&mut a)?;
    let tunsetoffload: u64 = libc::TUNSETOFFLOAD;
    match filter {
        Filter::Main => {
            event_loop(&mut a);
            timers(&mut a);
            stats(&mut a);
            kick(&mut a);
            a.any(&[
                // sd_notify on the socket made at start.
                Sysno::sendto,
                Sysno::sendmsg,
                // The disks' last flush.
                Sysno::fdatasync,
                Sysno::fsync,
                // The API socket's file at the end.
                Sysno::unlink,
                Sysno::unlinkat,
            ]);
        }
        Filter::Vcpu => {
            timers(&mut a);
            kick(&mut a);
            // Device activation registers a device's fds with the loop.
            a.any(&[Sysno::epoll_ctl]);
            // KVM_RUN, the registers and the code for a fault's report, and the TAP's
            // offloads when the driver sets up a virtio-net device (its
            // register writes are MMIO exits).
            a.one_of(
                Sysno::ioctl,
                1,
                &[
                    KVM_RUN,
                    KVM_GET_REGS,
                    KVM_GET_SREGS,
                    KVM_TRANSLATE,
                    tunsetoffload,
                ],
            )?;
            if ctx.serial_file {
                let append = libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC;
                a.any(&[
                    Sysno::rename,
                    Sysno::renameat,
                    Sysno::renameat2,
                    Sysno::ftruncate,
                ]);
                a.when(Sysno::openat, 2, Op::Eq, arg(append))?;
            }
        }
        Filter::VirtioDevices => {
            event_loop(&mut a);
            timers(&mut a);
            // TAP frames with their virtio-net header.
            a.any(&[Sysno::readv, Sysno::writev]);
            a.one_of(Sysno::ioctl, 1, &[tunsetoffload])?;
        }
        Filter::BlockIo => {
            a.any(&[
                Sysno::pread64,
                Sysno::pwrite64,
                Sysno::preadv,
                Sysno::pwritev,
                Sysno::fdatasync,
                Sysno::fsync,
                // DISCARD punches holes, WRITE_ZEROES too where it can.
                Sysno::fallocate,
            ]);
        }
        Filter::Api => {
            event_loop(&mut a);
            stats(&mut a);
            kick(&mut a);
            a.any(&[
                Sysno::accept4,
                Sysno::recvfrom,
                Sysno::recvmsg,
                Sysno::sendto,
                Sysno::sendmsg,
                Sysno::writev,
                Sysno::shutdown,
                Sysno::getsockopt,
                // tokio starts its request pool's threads on demand; glibc
                // uses clone3 (its flags are out of a filter's reach) and
                // falls back to clone, allowed for threads only.
                Sysno::clone3,
                Sysno::set_robust_list,
                Sysno::rseq,
                Sysno::sched_getaffinity,
            ]);
            let thread = arg(libc::CLONE_THREAD);
            a.when(Sysno::clone, 0, Op::MaskedEq(thread), thread)?;
            a.one_of(Sysno::prctl, 0, &[arg(libc::PR_SET_NAME)])?;
            // The host's KSM figures (/sys/kernel/mm/ksm, ksmd's
            // /proc/PID/stat) are read when asked for: opening for reading
            // only, nothing created, truncated or appended to.
            let write = libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND;
            a.when(Sysno::openat, 2, Op::MaskedEq(arg(write)), 0)?;
            // PUT /actions ksm_merge / ksm_unmerge.
            a.one_of(
                Sysno::madvise,
                2,
                &[arg(libc::MADV_MERGEABLE), arg(libc::MADV_UNMERGEABLE)],
            )?;
        }
    }
    Ok(a.rules)
}
