//! The SIGSYS handler: names the thread and the forbidden call on stderr,
//! then ends the VMM (docs/security.md says why not SECCOMP_RET_KILL).
//!
//! It runs in signal context: no allocation, no lock, only write(2) and
//! exit_group(2), which every filter allows.

use std::cell::Cell;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::outcome::ExitStatus;

/// A thread's name as the handler prints it (comm's 15 bytes).
const NAME_LEN: usize = 16;

thread_local! {
    // Const-initialised and without a destructor: reading it in the
    // handler neither allocates nor registers anything.
    static THREAD: Cell<[u8; NAME_LEN]> = const { Cell::new([0; NAME_LEN]) };
}

/// Remembers the calling thread's name for the handler.
pub(super) fn set_thread_name(name: &str) {
    let mut buf = [0u8; NAME_LEN];
    let n = name.len().min(NAME_LEN - 1);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD.with(|t| t.set(buf));
}

pub(super) fn install() -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::SigAction(on_sigsys),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: the handler only formats into a stack buffer, writes it to
    // fd 2 and exits; it touches no state another thread could hold.
    unsafe { sigaction(Signal::SIGSYS, &action) }.map(|_| ())
}

/// The syscall number of a SIGSYS siginfo: `si_syscall`, an int after
/// si_signo, si_errno, si_code (and padding) and `si_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

/// The first three arguments of the trapped call, from the registers the
/// kernel saved (x86_64: rdi, rsi, rdx).
fn args(ctx: *mut libc::c_void) -> [u64; 3] {
    if ctx.is_null() {
        return [0; 3];
    }
    // SAFETY: with SA_SIGINFO the third argument is the ucontext_t the
    // kernel wrote on this thread's stack.
    let gregs = unsafe { &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let reg = |r: libc::c_int| {
        usize::try_from(r)
            .ok()
            .and_then(|i| gregs.get(i))
            .map_or(0, |v| u64::from_ne_bytes(v.to_ne_bytes()))
    };
    [reg(libc::REG_RDI), reg(libc::REG_RSI), reg(libc::REG_RDX)]
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t, which is
    // 128 bytes; for SIGSYS from seccomp si_syscall lies at this offset.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let name = THREAD.with(Cell::get);
    let mut msg = Message::default();
    msg.push(b"ksmvm: error: seccomp: thread ");
    msg.push(trim_nul(&name));
    msg.push(b" made a forbidden system call: ");
    msg.push(
        usize::try_from(nr)
            .ok()
            .and_then(syscalls::Sysno::new)
            .map_or("unknown", |s| s.name())
            .as_bytes(),
    );
    msg.push(b" (");
    msg.push_number(nr);
    msg.push(b"); the VMM stops\n");
    // SAFETY: write(2) of our own stack buffer to stderr, async-signal-safe.
    unsafe { libc::write(2, msg.buf.as_ptr().cast(), msg.len) };
    // Then the arguments, on a line of their own: a path is read from the
    // thread's memory, and a bad pointer there must not cost the first line.
    let a = args(ctx);
    let mut more = Message::default();
    more.push(b"ksmvm: error: seccomp: its arguments: ");
    for (i, v) in a.iter().enumerate() {
        if i > 0 {
            more.push(b", ");
        }
        more.push_hex(*v);
    }
    let path = match i64::from(nr) {
        libc::SYS_openat => Some(a[1]),
        libc::SYS_open => Some(a[0]),
        _ => None,
    };
    if let Some(p) = path.filter(|&p| p != 0) {
        more.push(b"; path ");
        // SAFETY: the thread passed this pointer to open(2) as a NUL-ended
        // path; at most 64 bytes of it are read.
        unsafe { more.push_c_str(p as *const u8, 64) };
    }
    more.push(b"\n");
    // SAFETY: write(2) of our own stack buffer, then exit_group, both
    // async-signal-safe.
    unsafe {
        libc::write(2, more.buf.as_ptr().cast(), more.len);
        libc::_exit(ExitStatus::Failure.code().into());
    }
}

fn trim_nul(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// A fixed buffer the handler formats into.
pub(super) struct Message {
    pub(super) buf: [u8; 160],
    pub(super) len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Message {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Message {
    pub(super) fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    pub(super) fn push_hex(&mut self, v: u64) {
        let mut digits = [0u8; 18];
        digits[0] = b'0';
        digits[1] = b'x';
        let mut n = 2;
        let mut started = false;
        for shift in (0..16).rev() {
            let d = ((v >> (shift * 4)) & 0xf) as u8;
            if d != 0 || started || shift == 0 {
                started = true;
                digits[n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
                n += 1;
            }
        }
        self.push(&digits[..n]);
    }

    /// Up to `max` bytes of the NUL-ended string at `p`.
    ///
    /// # Safety
    /// `p` must point to readable memory up to its NUL or `max` bytes.
    pub(super) unsafe fn push_c_str(&mut self, p: *const u8, max: usize) {
        for i in 0..max {
            // SAFETY: within the caller's promise.
            let b = unsafe { p.add(i).read() };
            if b == 0 {
                break;
            }
            self.push(&[b]);
        }
    }

    pub(super) fn push_number(&mut self, v: i32) {
        let mut digits = [0u8; 11];
        let mut i = digits.len();
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if v < 0 {
            i -= 1;
            digits[i] = b'-';
        }
        self.push(&digits[i..]);
    }
}
