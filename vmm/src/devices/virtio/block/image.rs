//! A raw disk image: an open, locked file and byte-range operations on it.
//! Every range a guest names is checked against the image size here, with
//! checked arithmetic, before any system call sees it.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::lock::{self, Access, ClaimError, Claimed};
use crate::config::devices::DiskConfig;

pub const SECTOR_SIZE: u64 = 512;
/// Length of the virtio-blk serial returned by GET_ID.
pub const ID_LEN: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// Not a disk, in use elsewhere, or not lockable (see [`lock`]).
    #[error("disk image {path} {source}")]
    Refused { path: PathBuf, source: ClaimError },
    #[error("cannot find the size of disk image {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
}

/// A byte range of the image a request touches, already validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug)]
pub struct DiskImage {
    file: File,
    /// Backing files under a loop device, locked as long as the disk is open.
    _held: lock::Held,
    path: PathBuf,
    read_only: bool,
    /// Usable size: the file size rounded down to whole sectors.
    size: u64,
    id: [u8; ID_LEN],
}

impl DiskImage {
    /// Opens the image and takes its locks (see [`lock`]): a reader's for
    /// read-only disks, a writer's otherwise.
    pub fn open(cfg: &DiskConfig) -> Result<Self, ImageError> {
        let path = cfg.path.clone();
        let access = if cfg.read_only {
            Access::Read
        } else {
            Access::Write
        };
        let Claimed {
            mut file,
            meta,
            held,
        } = match lock::open(&path, access) {
            Ok(c) => c,
            Err(ClaimError::Open(source)) => return Err(ImageError::Open { path, source }),
            Err(source) => return Err(ImageError::Refused { path, source }),
        };
        // Seeking to the end also sizes block devices, whose metadata says 0.
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| ImageError::Size {
                path: path.clone(),
                source,
            })?;
        if bytes % SECTOR_SIZE != 0 {
            log::warn!(
                "disk image {}: size {bytes} is not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible to the guest",
                path.display(),
                bytes % SECTOR_SIZE
            );
        }
        let id = match &cfg.id {
            Some(id) => pad_id(id.as_str()),
            // Stable for the same file, distinct between files.
            None => pad_id(&format!("{:x}{:x}", meta.dev(), meta.ino())),
        };
        Ok(Self {
            file,
            _held: held,
            path,
            read_only: cfg.read_only,
            size: bytes - bytes % SECTOR_SIZE,
            id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn id(&self) -> &[u8; ID_LEN] {
        &self.id
    }

    /// The byte range of `len` bytes at `sector`, if it is whole sectors and
    /// lies inside the image.
    pub fn range(&self, sector: u64, len: u64) -> Option<Range> {
        if len % SECTOR_SIZE != 0 {
            return None;
        }
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= self.size).then_some(Range { offset, len })
    }

    /// The range of `sectors` sectors at `sector` (discard, write zeroes).
    pub fn sector_range(&self, sector: u64, sectors: u32) -> Option<Range> {
        self.range(sector, u64::from(sectors).checked_mul(SECTOR_SIZE)?)
    }

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes written data durable (the guest's FLUSH).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `r`; reads of it return zeros afterwards.
    pub fn punch_hole(&self, r: Range) -> io::Result<()> {
        // The image size never exceeds i64::MAX (it came from lseek).
        let (Ok(off), Ok(len)) = (i64::try_from(r.offset), i64::try_from(r.len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            // SAFETY: fallocate on our own fd; it touches no memory of ours.
            let ret = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
            };
            if ret == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Makes `r` read as zeros: a hole where the file system can, written
    /// zeros where it cannot.
    pub fn write_zeroes(&self, r: Range) -> io::Result<()> {
        match self.punch_hole(r) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            other => return other,
        }
        let zeros = vec![0u8; 64 * 1024];
        let mut done = 0u64;
        while done < r.len {
            let n = usize::try_from(r.len - done).map_or(zeros.len(), |left| left.min(zeros.len()));
            self.write_all_at(&zeros[..n], r.offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn pad_id(s: &str) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let n = s.len().min(ID_LEN);
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}
