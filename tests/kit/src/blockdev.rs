//! Block devices and image locks made by a test, undone on drop (also when
//! the test panics): loop devices ([`LoopDev`]), mounts ([`Mount`]), device
//! node aliases ([`mknod_alias`]), and a process holding QEMU-style image
//! lock bytes ([`ImageLockHolder`]). Loop devices, mounts and mknod need
//! root: check [`have_loop_devices`] first.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::vmm::contain;

/// Runs a command, failing with its stderr; returns its stdout.
fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    } else {
        Err(io::Error::other(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        )))
    }
}

/// Whether `program` is on PATH.
pub fn have_program(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Root, the loop driver and losetup (see [`crate::require`]).
pub fn have_loop_devices() -> bool {
    crate::require(
        crate::is_root() && Path::new("/dev/loop-control").exists() && have_program("losetup"),
        "root, /dev/loop-control and losetup (loop devices)",
    )
}

/// A loop device over a file, detached on drop (if a VMM still has it
/// open, the kernel detaches it when the VMM closes it).
#[derive(Debug)]
pub struct LoopDev {
    path: PathBuf,
}

impl LoopDev {
    /// `losetup --find --show FILE`, retried a few times: another test may
    /// take the free device between the lookup and the set-up.
    pub fn attach(file: &Path) -> io::Result<LoopDev> {
        let file = file
            .to_str()
            .ok_or_else(|| io::Error::other("path is not UTF-8"))?;
        let mut last = None;
        for _ in 0..5 {
            match run("losetup", &["--find", "--show", file]) {
                Ok(dev) => return Ok(LoopDev { path: dev.into() }),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.unwrap_or_else(|| io::Error::other("losetup failed")))
    }

    /// Like [`LoopDev::attach`], for tests.
    ///
    /// # Panics
    /// When no loop device can be set up.
    pub fn new(file: &Path) -> LoopDev {
        LoopDev::attach(file).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device's (major, minor).
    ///
    /// # Panics
    /// When the device node cannot be read.
    pub fn dev(&self) -> (u32, u32) {
        let rdev = std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("{}: {e}", self.path.display()))
            .rdev();
        (libc::major(rdev), libc::minor(rdev))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if let Some(p) = self.path.to_str() {
            let _ = run("losetup", &["--detach", p]);
        }
    }
}

/// A file system mounted by a test, unmounted on drop; the drop returns
/// once the kernel has let go of the device (that can come a little after
/// umount(8) returns).
#[derive(Debug)]
pub struct Mount {
    dev: PathBuf,
    dir: PathBuf,
}

impl Mount {
    /// Mounts `dev` on `dir` (which must exist).
    ///
    /// # Panics
    /// When mount(8) fails.
    pub fn new(dev: &Path, dir: &Path) -> Mount {
        let (d, m) = (dev.to_string_lossy(), dir.to_string_lossy());
        run("mount", &[&d, &m]).unwrap_or_else(|e| panic!("{e}"));
        Mount {
            dev: dev.to_owned(),
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let d = self.dir.to_string_lossy();
        if run("umount", &[&d]).is_err() {
            let _ = run("umount", &["--lazy", &d]);
        }
        let end = Instant::now() + Duration::from_secs(10);
        while exclusively_claimed(&self.dev) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether an exclusive open of block device `dev` fails with EBUSY (it is
/// mounted, stacked on, or opened O_EXCL).
pub fn exclusively_claimed(dev: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let r = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev);
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

/// Makes a block device node `path` for (major, minor): a second name for
/// a device (removed with the test's directory).
///
/// # Panics
/// When mknod fails.
pub fn mknod_alias(path: &Path, (major, minor): (u32, u32)) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("path has no NUL");
    // SAFETY: mknod reads a NUL-terminated path that outlives the call.
    let ret = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(
        ret,
        0,
        "mknod {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

/// Another process (`sleep`) holding OFD read locks on one-byte ranges of
/// an image, as QEMU does (bytes 100+ for what it holds, 200+ for what it
/// does not share; see ksmvm's block/lock/ofd.rs). Killed on drop.
#[derive(Debug)]
pub struct ImageLockHolder {
    child: Child,
}

/// QEMU's virtio-blk writer on a raw image.
pub const QEMU_WRITER_BYTES: &[i64] = &[100, 101, 201];
/// QEMU's virtio-blk reader (`readonly=on`).
pub const QEMU_READER_BYTES: &[i64] = &[100, 201];

impl ImageLockHolder {
    /// Locks `bytes` of `path` on a description that only the child keeps.
    ///
    /// # Panics
    /// When the file cannot be opened or locked, or sleep cannot be run.
    pub fn start(path: &Path, bytes: &[i64]) -> ImageLockHolder {
        let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for &b in bytes {
            ofd_read_lock(&file, b);
        }
        let fd = file.as_raw_fd();
        let mut cmd = Command::new("sleep");
        cmd.arg("300");
        contain(&mut cmd);
        // SAFETY: between fork and exec the closure only calls fcntl,
        // which is async-signal-safe, on a descriptor this process owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("cannot run sleep");
        drop(file);
        ImageLockHolder { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ImageLockHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "F_RDLCK and SEEK_SET are 0"
)]
fn ofd_read_lock(file: &File, byte: i64) {
    // SAFETY: flock is a plain C struct for which all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_RDLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: F_OFD_SETLK reads one flock, which outlives the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(ret, 0, "lock byte {byte}: {}", io::Error::last_os_error());
}

/// The /proc/locks lines about `path`'s inode (`OFDLCK ADVISORY READ -1
/// fe:00:1234 100 101`), without their index.
pub fn locks_on(path: &Path) -> Vec<String> {
    let Ok(m) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let want = format!(":{} ", m.ino());
    std::fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&want))
        .map(|l| {
            let rest = l.split_once(": ").map_or(l, |(_, r)| r);
            rest.split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect()
}

/// Waits until /proc/locks has a line about `path` containing `needle`.
///
/// # Panics
/// When none appears within `timeout`.
pub fn wait_for_lock(path: &Path, needle: &str, timeout: Duration) {
    let end = Instant::now() + timeout;
    while !locks_on(path).iter().any(|l| l.contains(needle)) {
        assert!(
            Instant::now() < end,
            "no lock {needle:?} on {} within {timeout:?}: {:?}",
            path.display(),
            locks_on(path)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
