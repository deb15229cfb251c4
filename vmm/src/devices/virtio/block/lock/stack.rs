//! What a block device is made of, from sysfs: the files under loop
//! devices (also through partitions and the devices a device-mapper or md
//! device is stacked on), the devices stacked on top of it, and its
//! partitions and whole disk.
//!
//! sysfs names a loop device's backing file by its current path
//! (`/sys/block/loopN/loop/backing_file`, d_path: renames are followed,
//! an unlinked file gets " (deleted)"). LOOP_GET_STATUS64 on the loop
//! device itself gives the file's device and inode, so that a path that
//! names another file in this mount namespace is caught.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// How deep a stack of devices is followed (loop on loop, dm on loop, ...).
pub const MAX_DEPTH: usize = 8;

/// A backing file found under a block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// The loop device, as sysfs names it (`loop3`).
    pub loop_name: String,
    pub path: PathBuf,
    /// Whether the disk itself is this loop device (or a partition of it),
    /// so that LOOP_GET_STATUS64 on the disk's descriptor can confirm the
    /// file; not for loops found below a stacked device.
    pub direct: bool,
}

/// Why a device's stack could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("cannot read {path}: {source}")]
    Sysfs { path: PathBuf, source: io::Error },
    #[error("its loop device {loop_name} reads a deleted file ({path}), which ksmvm cannot check")]
    Deleted { loop_name: String, path: PathBuf },
    #[error("it is stacked more than {MAX_DEPTH} devices deep")]
    TooDeep,
}

/// The sysfs tree (`/sys`; a fake one in unit tests).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::with_root("/sys")
    }
}

fn read(path: &Path) -> Result<String, StackError> {
    std::fs::read_to_string(path).map_err(|source| StackError::Sysfs {
        path: path.to_owned(),
        source,
    })
}

impl Sysfs {
    pub fn with_root(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
    }

    /// The device's directory, resolved (`/sys/devices/.../block/loop3`).
    fn dev_dir(&self, major: u64, minor: u64) -> Result<PathBuf, StackError> {
        let link = self.root.join(format!("dev/block/{major}:{minor}"));
        link.canonicalize()
            .map_err(|source| StackError::Sysfs { path: link, source })
    }

    /// A partition's directory is inside its disk's.
    fn whole_disk(dir: &Path) -> &Path {
        match dir.parent() {
            Some(parent) if dir.join("partition").exists() => parent,
            _ => dir,
        }
    }

    /// The backing files under device `major:minor`: its own (if it is a
    /// loop device or a partition of one) and those under every device it
    /// is stacked on (`slaves/`), depth first.
    pub fn backing_files(&self, major: u64, minor: u64) -> Result<Vec<Backing>, StackError> {
        let dir = self.dev_dir(major, minor)?;
        let mut out = Vec::new();
        self.walk(&dir, true, 0, &mut out)?;
        Ok(out)
    }

    fn walk(
        &self,
        dir: &Path,
        direct: bool,
        depth: usize,
        out: &mut Vec<Backing>,
    ) -> Result<(), StackError> {
        if depth > MAX_DEPTH {
            return Err(StackError::TooDeep);
        }
        let disk = Self::whole_disk(dir);
        let file = disk.join("loop/backing_file");
        if file.exists() {
            let text = read(&file)?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            let loop_name = name_of(disk);
            if let Some(gone) = text.strip_suffix(" (deleted)") {
                return Err(StackError::Deleted {
                    loop_name,
                    path: gone.into(),
                });
            }
            out.push(Backing {
                loop_name,
                path: text.into(),
                direct,
            });
        }
        // A partition has no slaves of its own; its disk's are its.
        let slaves = disk.join("slaves");
        if let Ok(entries) = std::fs::read_dir(&slaves) {
            let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                let p = p
                    .canonicalize()
                    .map_err(|source| StackError::Sysfs { path: p, source })?;
                self.walk(&p, false, depth + 1, out)?;
            }
        }
        Ok(())
    }

    /// The device, its whole disk if it is a partition, and the disk's
    /// partitions: the devices whose use makes an exclusive open fail.
    pub fn related(&self, major: u64, minor: u64) -> Vec<(u64, u64)> {
        let mut out = vec![(major, minor)];
        let Ok(dir) = self.dev_dir(major, minor) else {
            return out;
        };
        let disk = Self::whole_disk(&dir);
        let mut dirs = vec![disk.to_path_buf()];
        if let Ok(entries) = std::fs::read_dir(disk) {
            dirs.extend(
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join("partition").exists()),
            );
        }
        for d in dirs {
            if let Some(dev) = read(&d.join("dev")).ok().as_deref().and_then(parse_dev) {
                if !out.contains(&dev) {
                    out.push(dev);
                }
            }
        }
        out
    }

    /// The devices stacked on `major:minor` (device-mapper, md, ...), by
    /// name, sorted.
    pub fn holders(&self, major: u64, minor: u64) -> Vec<String> {
        let Ok(dir) = self.dev_dir(major, minor) else {
            return Vec::new();
        };
        let mut names: Vec<String> = std::fs::read_dir(dir.join("holders"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }
}

fn name_of(dir: &Path) -> String {
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// `7:3\n` → (7, 3).
pub fn parse_dev(s: &str) -> Option<(u64, u64)> {
    let (major, minor) = s.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// `struct loop_info64` of linux/loop.h (the kernel fills in every field;
/// only the first two are read).
#[repr(C)]
#[allow(dead_code)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4c05;

/// The (st_dev, st_ino) of the file loop device `file` reads, in the
/// encoding fstat uses; None when it is not a bound loop device.
pub fn loop_backing_id(file: &File) -> Option<(u64, u64)> {
    // SAFETY: LoopInfo64 is a plain C struct for which all-zero is valid.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one loop_info64, which outlives the
    // call; on a device that is not a loop device it fails with ENOTTY.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_GET_STATUS64, &mut info) };
    (ret == 0).then_some((info.lo_device, info.lo_inode))
}
