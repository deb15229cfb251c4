//! Advisory locks on disk images, so that two VMs never share a writable one.
//!
//! flock(2) rather than POSIX or OFD locks: flock locks belong to the open
//! file description, so two opens of the same image inside one VMM also
//! conflict (attaching one disk twice is as wrong as two VMs), and
//! /proc/locks names the pid that took them, which OFD locks do not.
//! Writable images take an exclusive lock, read-only ones a shared lock: any
//! number of VMs may read an image nobody writes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    Shared,
    Exclusive,
}

/// Why the lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// Someone else holds a conflicting lock; their pid if /proc/locks says.
    Held(Option<u32>),
    Io(io::Error),
}

/// Takes the lock without waiting. It lasts as long as `file` stays open.
pub fn lock(file: &File, kind: LockKind) -> Result<(), LockError> {
    let op = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let ret = unsafe { libc::flock(file.as_raw_fd(), op) };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Err(LockError::Held(holder_pid(file))),
            _ => return Err(LockError::Io(e)),
        }
    }
}

/// The pid that holds a flock on `file`, other than us, from /proc/locks.
fn holder_pid(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    find_holder(&locks, meta.dev(), meta.ino(), std::process::id())
}

/// Finds a FLOCK line for device `dev`, inode `ino` held by a pid other
/// than `self_pid`. (When the holder is this very process, it is reported
/// as this process: the disk was given twice.)
fn find_holder(locks: &str, dev: u64, ino: u64, self_pid: u32) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", dev_major(dev), dev_minor(dev));
    let mut ours = None;
    for line in locks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK ADVISORY WRITE 1234 fe:00:5308498 0 EOF"; waiters have
        // "->" after the id and are not holders.
        if f.len() < 6 || f[1] != "FLOCK" || f[5] != want {
            continue;
        }
        let Ok(pid) = f[4].parse::<u32>() else {
            continue;
        };
        if pid != self_pid {
            return Some(pid);
        }
        ours = Some(pid);
    }
    ours
}

// glibc's encoding of dev_t (major and minor are split across the word).
fn dev_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)
}

fn dev_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_locks() {
        let locks = "\
1: POSIX  ADVISORY  WRITE 77 fe:00:42 0 EOF
2: FLOCK  ADVISORY  WRITE 3736 fe:00:5308498 0 EOF
3: -> FLOCK  ADVISORY  WRITE 99 fe:00:42 0 EOF
4: FLOCK  ADVISORY  READ 26420 08:11:42 0 EOF
5: FLOCK  ADVISORY  WRITE 1234 fe:00:42 0 EOF
";
        let dev_fe00 = 0xfe00;
        assert_eq!(find_holder(locks, dev_fe00, 42, 1), Some(1234));
        assert_eq!(find_holder(locks, dev_fe00, 5308498, 1), Some(3736));
        assert_eq!(find_holder(locks, 0x0811, 42, 1), Some(26420));
        assert_eq!(find_holder(locks, dev_fe00, 43, 1), None);
        assert_eq!(
            find_holder(locks, dev_fe00, 42, 1234),
            Some(1234),
            "our own lock"
        );
        assert_eq!(find_holder("garbage\n\n1:\n", dev_fe00, 42, 1), None);
    }

    #[test]
    fn dev_t_split_matches_glibc() {
        // glibc's makedev, with both halves of both numbers in use.
        let (major, minor): (u64, u64) = (0x1_2345, 0x67_89ab);
        let dev =
            (major & 0xfff) << 8 | (major & !0xfff) << 32 | (minor & 0xff) | (minor & !0xff) << 12;
        assert_eq!(dev_major(dev), major);
        assert_eq!(dev_minor(dev), minor);
    }
}
