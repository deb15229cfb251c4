//! Who holds what: the process behind a conflicting lock or a busy block
//! device, found in procfs. Best effort and only on the error path: every
//! function here may find nothing (another PID namespace, no permission to
//! read another user's /proc/PID/fd), and the error then says so.
//!
//! * flock(2) locks: /proc/locks names the pid that took them.
//! * OFD locks: /proc/locks and F_OFD_GETLK say pid -1, so the open files
//!   of every process are searched: /proc/PID/fdinfo/N lists the locks
//!   held through that open file description (`lock:` lines).
//! * Block devices opened with O_EXCL: nothing records the holder, so the
//!   processes that have the device open are listed (/proc/PID/fd/N,
//!   which stat follows to the device node).

use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::ofd::Found;

/// A process, with its command name if /proc says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub comm: Option<String>,
}

impl Holder {
    pub fn of(proc_root: &Path, pid: u32) -> Holder {
        let comm = std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
            .ok()
            .map(|c| c.trim_end().to_owned())
            .filter(|c| !c.is_empty());
        Holder { pid, comm }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if let Some(c) = &self.comm {
            write!(f, ", {c}")?;
        }
        Ok(())
    }
}

/// One lock line of /proc/locks or of a `lock:` line in fdinfo:
/// `1: OFDLCK ADVISORY  READ -1 fe:00:5308498 100 101`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockLine {
    /// FLOCK, POSIX, OFDLCK, LEASE, ...
    pub class: String,
    pub write: bool,
    /// None for OFD locks (-1).
    pub pid: Option<u32>,
    /// `MAJOR:MINOR:INODE`, major and minor in hex.
    pub file: String,
    pub start: i64,
    /// Inclusive; None for EOF.
    pub end: Option<i64>,
}

impl LockLine {
    /// Parses one line; None for waiters (`1: -> FLOCK ...`) and anything
    /// that is not a lock line.
    pub fn parse(line: &str) -> Option<LockLine> {
        let line = line.strip_prefix("lock:").unwrap_or(line);
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f.get(1) == Some(&"->") {
            return None;
        }
        let write = match f[3] {
            "WRITE" => true,
            "READ" => false,
            _ => return None,
        };
        Some(LockLine {
            class: f[1].to_owned(),
            write,
            pid: f[4].parse::<u32>().ok(),
            file: f[5].to_owned(),
            start: f[6].parse().ok()?,
            end: match f[7] {
                "EOF" => None,
                e => Some(e.parse().ok()?),
            },
        })
    }

    fn covers(&self, byte: i64) -> bool {
        self.start <= byte && self.end.is_none_or(|e| byte <= e)
    }
}

/// `MAJOR:MINOR:INODE` as /proc/locks writes it.
pub fn lock_file_id(dev: u64, ino: u64) -> String {
    format!("{:02x}:{:02x}:{ino}", dev_major(dev), dev_minor(dev))
}

/// The pid of a flock(2) lock on the file, from /proc/locks. A lock of
/// another process wins over one of `self_pid` (which means the disk was
/// given twice).
pub fn find_flock_holder(locks: &str, dev: u64, ino: u64, self_pid: u32) -> Option<u32> {
    let want = lock_file_id(dev, ino);
    let mut ours = None;
    for l in locks.lines().filter_map(LockLine::parse) {
        if l.class != "FLOCK" || l.file != want {
            continue;
        }
        match l.pid {
            Some(pid) if pid != self_pid => return Some(pid),
            Some(pid) => ours = Some(pid),
            None => {}
        }
    }
    ours
}

/// Whether fdinfo text holds a lock like `found` (same kind, covering its
/// first byte) on the file.
pub fn fdinfo_holds(fdinfo: &str, file_id: &str, found: &Found) -> bool {
    fdinfo
        .lines()
        .filter(|l| l.starts_with("lock:"))
        .filter_map(LockLine::parse)
        .any(|l| l.file == file_id && l.write == found.write && l.covers(found.start))
}

/// Every process's open files: (pid, fd number, the fd's /proc path).
fn open_files(proc_root: &Path) -> impl Iterator<Item = (u32, String, std::path::PathBuf)> + '_ {
    let pids = std::fs::read_dir(proc_root).into_iter().flatten().flatten();
    pids.filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path())))
        .flat_map(|(pid, dir)| {
            let fds = std::fs::read_dir(dir.join("fd"))
                .into_iter()
                .flatten()
                .flatten();
            fds.filter_map(move |fd| Some((pid, fd.file_name().to_str()?.to_owned(), fd.path())))
        })
}

/// The process holding an OFD (or classic POSIX) lock like `found` on the
/// file (dev, ino), other than through `own` (our pid and fd). Only fdinfo
/// is read (its lock lines name the file), never the files themselves, so
/// a hung file system elsewhere cannot stall the search.
pub fn lock_holder(
    proc_root: &Path,
    dev: u64,
    ino: u64,
    found: &Found,
    own: (u32, i32),
) -> Option<Holder> {
    if let Some(pid) = found.pid {
        return Some(Holder::of(proc_root, pid));
    }
    let id = lock_file_id(dev, ino);
    let (own_pid, own_fd) = (own.0, own.1.to_string());
    open_files(proc_root)
        .filter(|(pid, fd, _)| !(*pid == own_pid && *fd == own_fd))
        .find(|(pid, fd, _)| {
            std::fs::read_to_string(proc_root.join(format!("{pid}/fdinfo/{fd}")))
                .is_ok_and(|info| fdinfo_holds(&info, &id, found))
        })
        .map(|(pid, _, _)| Holder::of(proc_root, pid))
}

/// The processes that have one of the block devices `rdevs` open, each
/// once, in pid order.
pub fn block_openers(proc_root: &Path, rdevs: &[u64]) -> Vec<u32> {
    let mut pids: Vec<u32> = open_files(proc_root)
        .filter(|(_, _, link)| {
            std::fs::metadata(link)
                .is_ok_and(|m| m.file_type().is_block_device() && rdevs.contains(&m.rdev()))
        })
        .map(|(pid, _, _)| pid)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Where device `major:minor` is mounted, from /proc/self/mountinfo text
/// (`36 35 98:0 /mnt1 /mnt/parent rw,noatime ...`).
pub fn mount_point(mountinfo: &str, major: u64, minor: u64) -> Option<String> {
    let want = format!("{major}:{minor}");
    mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 4 && f[2] == want).then(|| unescape(f[4]))
    })
}

/// Undoes the kernel's octal escapes in mountinfo (`\040` for a space).
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (b[i], oct) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// glibc's encoding of dev_t (major and minor are split across the word).
pub fn dev_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)
}

pub fn dev_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}

/// glibc's makedev.
pub fn make_dev(major: u64, minor: u64) -> u64 {
    (major & 0xfff) << 8 | (major & !0xfff) << 32 | (minor & 0xff) | (minor & !0xff) << 12
}
