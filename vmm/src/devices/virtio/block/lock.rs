//! Opening a disk so that no two VMs write the same data: the locks follow
//! what the data is, not the path it was named by.
//!
//! * **The path** is resolved by the kernel (symlinks followed); what it
//!   names must be a regular file or a block device. Anything else (a
//!   directory, FIFO, character device, socket) is refused before it is
//!   opened, so that naming `/dev/watchdog` or a FIFO as a disk has no side
//!   effect and cannot hang. The file is opened O_NONBLOCK and checked to
//!   be the inode that was looked at.
//! * **Every disk** takes two kinds of advisory lock, both on the open
//!   file description, so that they last exactly as long as the disk's
//!   descriptor and two opens inside one VMM conflict like two VMs:
//!   - QEMU's image locks ([`ofd`]): OFD byte-range locks on bytes 100+
//!     and 200+, the ones QEMU and Cloud Hypervisor's QEMU-compatible mode
//!     take. A writable disk takes a QEMU writer's and a read-only disk a
//!     QEMU reader's, so that ksmvm and QEMU never both write one image and
//!     readers share.
//!   - flock(2), exclusive for writers and shared for readers, as ksmvm
//!     took before: it is kept so that a ksmvm of this version and an
//!     older one (flock only) still refuse each other, and because
//!     /proc/locks names the pid behind a flock, which the message about a
//!     second ksmvm then gives without searching every process's files.
//!     flock is taken first, then the image locks. The two do not
//!     interact on local file systems; on NFS, Linux emulates flock with a
//!     whole-file byte-range lock of the same owner (not tested here).
//! * **A block device** is opened O_EXCL (Linux: an exclusive claim of the
//!   device itself, not of the node): a device that is mounted, that a
//!   device-mapper or md device sits on, or that another VM opened O_EXCL
//!   through any node (a `mknod` alias included) is refused with EBUSY,
//!   and the error says which of these it found. The locks above are then
//!   also taken on the node (QEMU's only meet ours through the same node).
//!   A read-only block device is opened O_EXCL too: a block device serves
//!   one VM at a time; read-only sharing is for image files.
//! * **A loop device** is followed to its backing file (sysfs, confirmed
//!   with LOOP_GET_STATUS64), through partitions and through the devices a
//!   stacked device sits on, and the backing file is opened and locked
//!   like a disk of the same access, for as long as the disk is open. So a
//!   VM on `data.img` and a VM on a loop device over it refuse each other
//!   whichever starts first. A backing file ksmvm cannot open, or one that
//!   was deleted, makes the disk fail: its users cannot be checked.
//!
//! Limits: advisory locks bind only those who take them (a process that
//! opens the image without locking, or the host mounting a loop device
//! over an image a VM uses, is not stopped); what sysfs does not show is not
//! followed (a device-mapper target over a file other than through a loop
//! device, network block devices); two partitions of one loop device count
//! as the whole device for the backing file's locks.

mod holder;
mod ofd;
mod stack;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use holder::{dev_major, dev_minor, Holder};
use ofd::SetError;
use stack::{Backing, StackError, Sysfs, MAX_DEPTH};

/// How a disk is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// An opened, locked disk.
#[derive(Debug)]
pub struct Claimed {
    pub file: File,
    pub meta: Metadata,
    pub held: Held,
}

/// What a disk holds besides its own descriptor: the backing files and
/// devices under it, open (and locked) as long as the disk is.
#[derive(Debug, Default)]
pub struct Held(#[allow(dead_code)] Vec<File>);

/// Why a disk was refused. Each message completes "disk image PATH ...".
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("cannot be opened: {0}")]
    Open(#[source] io::Error),
    #[error("is {0}, not a regular file or block device")]
    NotADisk(&'static str),
    #[error("is {0}")]
    InUse(InUse),
    #[error("cannot be locked: {0}")]
    Lock(#[source] io::Error),
    #[error("is a block device whose backing cannot be checked: {0}")]
    Stack(#[source] StackError),
    #[error("is {via} {backing}, which {source}")]
    Backing {
        /// "a loop device on", or "stacked on loopN, a loop device on".
        via: String,
        backing: PathBuf,
        source: Box<ClaimError>,
    },
    #[error("is a loop device whose backing file is not {backing} in this mount namespace (sysfs names it, the loop device reads another)")]
    BackingMismatch { backing: PathBuf },
}

/// Who else uses the disk.
#[derive(Debug, thiserror::Error)]
pub enum InUse {
    #[error("in use by another VM (lock held by pid {0})")]
    Flock(u32),
    #[error("in use by another VM (lock holder unknown)")]
    FlockUnknown,
    #[error("in use by another process that {meaning} ({holder})")]
    Bytes {
        meaning: &'static str,
        holder: MaybeHolder,
    },
    #[error("mounted on the host at {0}")]
    Mounted(String),
    #[error("in use by {0}, which is stacked on it")]
    Stacked(String),
    #[error("already open in this VM (the same disk given twice?)")]
    Twice,
    #[error("opened exclusively by another process ({0})")]
    Opener(Holder),
    #[error("opened exclusively by another process or claimed by the kernel (holder not found)")]
    Busy,
}

/// A holder, or the admission that none was found.
#[derive(Debug)]
pub struct MaybeHolder(pub Option<Holder>);

impl fmt::Display for MaybeHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(h) => h.fmt(f),
            None => f.write_str("holder not found"),
        }
    }
}

const PROC: &str = "/proc";

/// Opens the disk at `path` and takes every lock (see the module
/// documentation). Everything is released when the returned files close.
pub fn open(path: &Path, access: Access) -> Result<Claimed, ClaimError> {
    let (file, meta) = open_node(path, access)?;
    let mut held = Vec::new();
    claim(&file, &meta, access, 0, &mut held)?;
    Ok(Claimed {
        file,
        meta,
        held: Held(held),
    })
}

/// Opens a regular file or block device (O_EXCL) without side effects on
/// anything else, and returns it with its metadata.
fn open_node(path: &Path, access: Access) -> Result<(File, Metadata), ClaimError> {
    let before = std::fs::metadata(path).map_err(ClaimError::Open)?;
    let t = before.file_type();
    let block = t.is_block_device();
    if !t.is_file() && !block {
        return Err(ClaimError::NotADisk(crate::file_kind(&t)));
    }
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if block {
        flags |= libc::O_EXCL;
    }
    let file = match OpenOptions::new()
        .read(true)
        .write(access == Access::Write)
        .custom_flags(flags)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if block && e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(ClaimError::InUse(busy(before.rdev())));
        }
        Err(e) => return Err(ClaimError::Open(e)),
    };
    let meta = file.metadata().map_err(ClaimError::Open)?;
    if (meta.dev(), meta.ino()) != (before.dev(), before.ino()) {
        return Err(ClaimError::Open(io::Error::other(
            "it was replaced while it was being opened",
        )));
    }
    set_blocking(&file).map_err(ClaimError::Open)?;
    Ok((file, meta))
}

fn set_blocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL on our own descriptor; no memory is involved.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on our own descriptor; no memory is involved.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes the locks on an open disk, then follows a block device to the
/// files under it and claims those (`held` keeps them open).
fn claim(
    file: &File,
    meta: &Metadata,
    access: Access,
    depth: usize,
    held: &mut Vec<File>,
) -> Result<(), ClaimError> {
    take_flock(file, meta, access)?;
    take_image_locks(file, meta, access)?;
    if !meta.file_type().is_block_device() {
        return Ok(());
    }
    let rdev = meta.rdev();
    let backings = Sysfs::default()
        .backing_files(dev_major(rdev), dev_minor(rdev))
        .map_err(ClaimError::Stack)?;
    for b in backings {
        if depth >= MAX_DEPTH {
            return Err(ClaimError::Stack(StackError::TooDeep));
        }
        let wrap = |source| ClaimError::Backing {
            via: via(&b),
            backing: b.path.clone(),
            source: Box::new(source),
        };
        let (bfile, bmeta) = open_node(&b.path, Access::Read).map_err(wrap)?;
        if b.direct {
            if let Some(id) = stack::loop_backing_id(file) {
                if id != (bmeta.dev(), bmeta.ino()) {
                    return Err(ClaimError::BackingMismatch {
                        backing: b.path.clone(),
                    });
                }
            }
        }
        claim(&bfile, &bmeta, access, depth + 1, held).map_err(wrap)?;
        held.push(bfile);
    }
    Ok(())
}

fn via(b: &Backing) -> String {
    if b.direct {
        "a loop device on".to_owned()
    } else {
        format!("stacked on {}, a loop device on", b.loop_name)
    }
}

/// flock(2) without waiting: exclusive for writers, shared for readers.
fn take_flock(file: &File, meta: &Metadata, access: Access) -> Result<(), ClaimError> {
    let op = match access {
        Access::Read => libc::LOCK_SH,
        Access::Write => libc::LOCK_EX,
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                let me = std::process::id();
                let locks = std::fs::read_to_string(Path::new(PROC).join("locks"));
                let pid = locks
                    .ok()
                    .and_then(|l| holder::find_flock_holder(&l, meta.dev(), meta.ino(), me));
                return Err(ClaimError::InUse(match pid {
                    // Only this VMM holds it: the same data named twice.
                    Some(p) if p == me => InUse::Twice,
                    Some(p) => InUse::Flock(p),
                    None => InUse::FlockUnknown,
                }));
            }
            _ => return Err(ClaimError::Lock(e)),
        }
    }
}

/// QEMU's lock bytes: lock ours, then test for conflicting ones.
fn take_image_locks(file: &File, meta: &Metadata, access: Access) -> Result<(), ClaimError> {
    let perms = match access {
        Access::Read => ofd::READER,
        Access::Write => ofd::WRITER,
    };
    let in_use = |meaning, found: ofd::Found| {
        let own = (std::process::id(), file.as_raw_fd());
        let h = holder::lock_holder(Path::new(PROC), meta.dev(), meta.ino(), &found, own);
        ClaimError::InUse(InUse::Bytes {
            meaning,
            holder: MaybeHolder(h),
        })
    };
    // On NFS and 9p, flock(2) is a classic whole-file lock owned by this
    // process: our own flock (taken just before) shows up here, and it
    // guards the image as the bytes would (QEMU's probes see it too).
    let me = std::process::id();
    let ours = |found: &ofd::Found| found.pid == Some(me);
    for byte in perms.bytes_to_lock() {
        match ofd::lock_byte(file, byte) {
            Ok(()) => {}
            Err(SetError::Conflict(found)) if ours(&found) => {}
            Err(SetError::Conflict(found)) => return Err(in_use("locks it for writing", found)),
            Err(SetError::Io(e)) => return Err(ClaimError::Lock(e)),
        }
    }
    for probe in perms.bytes_to_test() {
        if let Some(found) = ofd::test_write(file, probe.byte).map_err(ClaimError::Lock)? {
            let compatible = ours(&found)
                || (found.is_whole_file_reader()
                    && !perms.conflicts_with_whole_file_reader(&probe));
            if !compatible {
                return Err(in_use(probe.meaning, found));
            }
        }
    }
    Ok(())
}

/// Why an exclusive open of block device `rdev` failed with EBUSY.
fn busy(rdev: u64) -> InUse {
    let sys = Sysfs::default();
    let related = sys.related(dev_major(rdev), dev_minor(rdev));
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        if let Some(m) = related
            .iter()
            .find_map(|&(a, b)| holder::mount_point(&info, a, b))
        {
            return InUse::Mounted(m);
        }
    }
    let stacked: Vec<String> = related
        .iter()
        .flat_map(|&(a, b)| sys.holders(a, b))
        .collect();
    if !stacked.is_empty() {
        return InUse::Stacked(stacked.join(", "));
    }
    let rdevs: Vec<u64> = related
        .iter()
        .map(|&(a, b)| holder::make_dev(a, b))
        .collect();
    let pids = holder::block_openers(Path::new(PROC), &rdevs);
    let me = std::process::id();
    match pids.iter().find(|&&p| p != me) {
        Some(&p) => InUse::Opener(Holder::of(Path::new(PROC), p)),
        None if pids.contains(&me) => InUse::Twice,
        None => InUse::Busy,
    }
}
