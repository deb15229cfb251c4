use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use seccompiler::SeccompAction;

use super::rules::{KVM_GET_REGS, KVM_GET_SREGS, KVM_RUN, KVM_TRANSLATE};
use super::sigsys::Message;
use super::*;

#[test]
fn every_filter_compiles_in_both_modes_and_with_a_serial_file() {
    for ctx in [Context::default(), Context { serial_file: true }] {
        for action in [SeccompAction::Trap, SeccompAction::Log] {
            let filters = compile_all(&ctx, action).unwrap();
            assert_eq!(filters.len(), Filter::ALL.len());
            for (f, bpf) in &filters {
                // Far below the kernel's 4096 instructions per program.
                assert!(bpf.len() > 20 && bpf.len() < 1024, "{f:?}: {}", bpf.len());
            }
        }
    }
}

#[test]
fn kvm_ioctl_numbers_are_the_kernels() {
    // linux/kvm.h on x86_64.
    assert_eq!(KVM_RUN, 0xae80);
    assert_eq!(KVM_GET_REGS, 0x8090_ae81);
    assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
    assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
}

#[test]
fn every_thread_kind_has_its_filter_or_inherits_one() {
    use crate::threads::ThreadKind;
    assert_eq!(Filter::for_thread(ThreadKind::Vcpu(3)), Some(Filter::Vcpu));
    assert_eq!(
        Filter::for_thread(ThreadKind::BlockIo),
        Some(Filter::BlockIo)
    );
    assert_eq!(
        Filter::for_thread(ThreadKind::VirtioDevices),
        Some(Filter::VirtioDevices)
    );
    assert_eq!(Filter::for_thread(ThreadKind::Api), Some(Filter::Api));
    assert_eq!(Filter::for_thread(ThreadKind::ApiWorker), None);
    let names: std::collections::HashSet<_> = Filter::ALL.iter().map(|f| f.name()).collect();
    assert_eq!(names.len(), Filter::ALL.len());
}

#[test]
fn the_handlers_message_formats_numbers_without_allocating() {
    for (v, want) in [(0, "0"), (72, "72"), (-1, "-1"), (i32::MIN, "-2147483648")] {
        let mut m = Message::default();
        m.push_number(v);
        assert_eq!(&m.buf[..m.len], want.as_bytes());
    }
    for (v, want) in [(0, "0x0"), (0x1f, "0x1f"), (u64::MAX, "0xffffffffffffffff")] {
        let mut m = Message::default();
        m.push_hex(v);
        assert_eq!(&m.buf[..m.len], want.as_bytes());
    }
    let mut m = Message::default();
    m.push(&[b'x'; 500]);
    assert_eq!(m.len, m.buf.len(), "a long message is cut, not overrun");
}

/// Runs `child` in a forked process with stderr on a pipe; returns its
/// exit code and what it wrote.
fn in_child(child: impl FnOnce() -> i32) -> (i32, String) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are fresh fds that we own.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only calls async-signal-safe functions (dup2,
    // prctl/seccomp, sigaction, write, _exit) before it exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: see above; the child never returns into the test harness.
        unsafe {
            libc::dup2(tx.as_raw_fd(), 2);
            libc::_exit(child());
        }
    }
    drop(tx);
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let out = std::fs::read_to_string(format!("/proc/self/fd/{}", rx.as_raw_fd()));
    let text = out.unwrap_or_default();
    assert!(libc::WIFEXITED(status), "child status {status:#x}: {text}");
    (libc::WEXITSTATUS(status), text)
}

/// Runs `work` in a forked child as thread `name` under `filter` (trapping,
/// with the SIGSYS handler); returns the child's exit code and stderr.
fn under_filter(filter: Filter, name: &'static str, work: impl FnOnce() -> i32) -> (i32, String) {
    let filters = compile_all(&Context::default(), SeccompAction::Trap).unwrap();
    let bpf = filters[&filter].clone();
    in_child(move || {
        sigsys::set_thread_name(name);
        if sigsys::install().is_err() || seccompiler::apply_filter(&bpf).is_err() {
            return 99;
        }
        work()
    })
}

#[test]
fn a_forbidden_call_ends_the_process_naming_thread_and_call() {
    let (code, text) = under_filter(Filter::Vcpu, "vcpu7", || {
        // Forbidden in every filter.
        // SAFETY: personality(0xffffffff) only queries.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
        98
    });
    assert_eq!(code, 1, "{text}");
    // personality takes one argument: the other registers are whatever
    // they held.
    assert!(
        text.starts_with(
            "ksmvm: error: seccomp: thread vcpu7 made a forbidden system call: personality (135); the VMM stops\n\
             ksmvm: error: seccomp: its arguments: 0xffffffff, "
        ),
        "{text}"
    );
}

#[test]
fn a_forbidden_open_names_its_path() {
    let (code, text) = under_filter(Filter::BlockIo, "virtio-blk-io", || {
        // SAFETY: a NUL-ended path; the call is trapped before it runs.
        unsafe { libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
        98
    });
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("openat (257)"), "{text}");
    assert!(text.contains("; path /etc/hostname\n"), "{text}");
}

#[test]
fn allowed_calls_go_through_and_argument_rules_bite() {
    // Allowed: the block thread's own calls.
    let (code, text) = under_filter(Filter::BlockIo, "virtio-blk-io", || {
        // SAFETY: getpid and a write of our own bytes have no preconditions.
        unsafe {
            libc::getpid();
            libc::write(2, b"ok".as_ptr().cast(), 2);
        }
        7
    });
    assert_eq!((code, text.as_str()), (7, "ok"));
    // An executable mapping is refused even where mmap is allowed.
    let (code, text) = under_filter(Filter::BlockIo, "virtio-blk-io", || {
        // SAFETY: an anonymous mapping we never use.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        98
    });
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("thread virtio-blk-io made a forbidden system call: mmap (9)"),
        "{text}"
    );
}
