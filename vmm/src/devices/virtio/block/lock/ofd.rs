//! QEMU's image locking, spoken with OFD byte-range locks.
//!
//! QEMU (block/file-posix.c, `file.locking=auto`) describes what an open
//! image is used for with one-byte OFD read locks: byte `100 + p` says "I
//! hold permission p" and byte `200 + p` says "I do not let others hold
//! permission p", for p = 0 consistent read, 1 write, 2 write-unchanged,
//! 3 resize (QEMU before 7.0 also had 4, graph-mod). Taking a permission
//! means first locking one's own bytes, then testing (F_OFD_GETLK with a
//! write lock) that nobody else holds a byte that conflicts: the
//! "unshared" byte of each permission one wants, and the permission byte
//! of each permission one does not share. Since every lock is a read lock,
//! locking never conflicts; two processes starting at once both see each
//! other and both fail, never both succeed.
//!
//! ksmvm takes exactly what a QEMU virtio-blk device on a raw image takes
//! (measured with QEMU 10.0 in /proc/locks): a writer holds consistent read
//! and write and does not share write (bytes 100, 101, 201); a reader holds
//! consistent read and does not share write (bytes 100, 201). Resize and
//! write-unchanged are shared, as QEMU's device shares them. So ksmvm and
//! QEMU refuse each other as two QEMUs do: no second writer, no reader
//! beside a writer, any number of readers. A whole-file lock (Cloud
//! Hypervisor's `lock_granularity=full`) covers every byte and conflicts
//! with both kinds.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Where QEMU's permission bytes and "unshared" bytes start (QEMU leaves
/// the bytes below 100 to libvirt).
pub const PERM_BASE: i64 = 100;
pub const SHARED_BASE: i64 = 200;

/// QEMU's block permissions (`BLK_PERM_*`), as bit numbers. ksmvm neither
/// holds nor unshares the last two; they are here to name QEMU's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)]
pub enum Perm {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

impl Perm {
    fn bit(self) -> i64 {
        self as i64
    }

    /// What a process holding this permission does to the image.
    fn doing(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "reads it",
            Perm::Write => "writes it",
            Perm::WriteUnchanged => "writes it (without changing its data)",
            Perm::Resize => "resizes it",
        }
    }

    /// What a process that does not share this permission forbids.
    fn forbidding(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "does not let others read it",
            Perm::Write => "does not let others write it",
            Perm::WriteUnchanged => "does not let others write it unchanged",
            Perm::Resize => "does not let others resize it",
        }
    }
}

/// What one user of an image holds and refuses to share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub held: &'static [Perm],
    pub unshared: &'static [Perm],
}

/// A QEMU virtio-blk writer: `-drive ...,format=raw`.
pub const WRITER: Perms = Perms {
    held: &[Perm::ConsistentRead, Perm::Write],
    unshared: &[Perm::Write],
};

/// A QEMU virtio-blk reader: `-drive ...,format=raw,readonly=on`.
pub const READER: Perms = Perms {
    held: &[Perm::ConsistentRead],
    unshared: &[Perm::Write],
};

/// One byte to test, and what a lock there says about its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub byte: i64,
    pub meaning: &'static str,
}

impl Perms {
    /// The bytes to lock: one per held permission, one per unshared one.
    pub fn bytes_to_lock(&self) -> Vec<i64> {
        let held = self.held.iter().map(|p| PERM_BASE + p.bit());
        let unshared = self.unshared.iter().map(|p| SHARED_BASE + p.bit());
        held.chain(unshared).collect()
    }

    /// The bytes another user's lock on which conflicts with us: the
    /// "unshared" byte of every permission we hold, and the permission byte
    /// of every permission we do not share, in QEMU's order.
    pub fn bytes_to_test(&self) -> Vec<Probe> {
        let held = self.held.iter().map(|p| Probe {
            byte: SHARED_BASE + p.bit(),
            meaning: p.forbidding(),
        });
        let unshared = self.unshared.iter().map(|p| Probe {
            byte: PERM_BASE + p.bit(),
            meaning: p.doing(),
        });
        held.chain(unshared).collect()
    }
}

/// A lock someone else holds, as F_OFD_GETLK reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub write: bool,
    pub start: i64,
    /// 0: to the end of the file.
    pub len: i64,
    /// The holder for a classic POSIX lock; None for OFD locks (-1).
    pub pid: Option<u32>,
}

// The lock kinds and SEEK_SET are 0..=2: they fit a c_short.
#[allow(clippy::cast_possible_truncation)]
fn flock_for(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

impl Found {
    /// A read lock over the whole file: a reader that does not let others
    /// write (Cloud Hypervisor's whole-file readers, and flock(LOCK_SH) on
    /// NFS and 9p, which those file systems turn into a classic whole-file
    /// lock).
    pub fn is_whole_file_reader(&self) -> bool {
        !self.write && self.start == 0 && self.len == 0
    }
}

impl Perms {
    /// Whether a whole-file reader conflicts with what `probe` tests: only
    /// when we write (its lock covers the "unshared write" byte).
    pub fn conflicts_with_whole_file_reader(&self, probe: &Probe) -> bool {
        probe.byte == SHARED_BASE + Perm::Write.bit()
    }
}

/// Why a byte could not be locked.
#[derive(Debug)]
pub enum SetError {
    /// Someone holds a write lock over it (a whole-file or classic lock).
    Conflict(Found),
    Io(io::Error),
}

/// Takes an OFD read lock on one byte; it lasts until `file` is closed.
pub fn lock_byte(file: &File, byte: i64) -> Result<(), SetError> {
    let fl = flock_for(libc::F_RDLCK, byte, 1);
    loop {
        // SAFETY: F_OFD_SETLK reads one flock, which outlives the call.
        let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN | libc::EACCES) => {
                // The lock that refused us; if it went away meanwhile,
                // report the byte itself.
                let found = test_write(file, byte).map_err(SetError::Io)?;
                return Err(SetError::Conflict(found.unwrap_or(Found {
                    write: true,
                    start: byte,
                    len: 1,
                    pid: None,
                })));
            }
            _ => return Err(SetError::Io(e)),
        }
    }
}

/// The first lock held through another open file description that would
/// conflict with a write lock on `byte`, i.e. any lock there.
pub fn test_write(file: &File, byte: i64) -> io::Result<Option<Found>> {
    let mut fl = flock_for(libc::F_WRLCK, byte, 1);
    // SAFETY: F_OFD_GETLK reads and writes one flock, which outlives the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    if i32::from(fl.l_type) == libc::F_UNLCK {
        return Ok(None);
    }
    Ok(Some(Found {
        write: i32::from(fl.l_type) == libc::F_WRLCK,
        start: fl.l_start,
        len: fl.l_len,
        pid: u32::try_from(fl.l_pid).ok().filter(|&p| p > 0),
    }))
}
