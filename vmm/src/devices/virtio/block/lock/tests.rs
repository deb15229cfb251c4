use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};

use super::holder::*;
use super::ofd::{self, Found, Probe, READER, WRITER};
use super::stack::*;
use super::*;
use crate::devices::virtio::test_util::TempDir;

fn image(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, vec![0u8; 64 * 1024]).unwrap();
    p
}

fn refusal(path: &Path, access: Access) -> String {
    match open(path, access) {
        Ok(_) => panic!("{} was not refused", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn qemu_bytes_of_a_writer_and_a_reader() {
    // What QEMU 10's virtio-blk holds in /proc/locks: 100-101 and 201 for
    // a writer, 100 and 201 for a reader.
    assert_eq!(WRITER.bytes_to_lock(), [100, 101, 201]);
    assert_eq!(READER.bytes_to_lock(), [100, 201]);
    let bytes = |p: Vec<Probe>| p.iter().map(|p| p.byte).collect::<Vec<_>>();
    assert_eq!(bytes(WRITER.bytes_to_test()), [200, 201, 101]);
    assert_eq!(bytes(READER.bytes_to_test()), [200, 101]);
    let w = WRITER.bytes_to_test();
    assert_eq!(w[1].meaning, "does not let others write it");
    assert_eq!(w[2].meaning, "writes it");
}

/// Only QEMU's byte locks, without flock, between two open file
/// descriptions of one file.
#[test]
fn image_locks_alone_keep_one_writer_and_share_readers() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let f = || File::open(&p).unwrap();
    let meta = std::fs::metadata(&p).unwrap();
    let take =
        |file: &File, access| take_image_locks(file, &meta, access).map_err(|e| e.to_string());

    let w1 = f();
    take(&w1, Access::Write).unwrap();
    let err = take(&f(), Access::Write).unwrap_err();
    assert!(err.contains("does not let others write it"), "{err}");
    let err = take(&f(), Access::Read).unwrap_err();
    assert!(err.contains("that writes it"), "{err}");
    // The holder is found through /proc/self/fdinfo: this very process.
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(w1);

    let (r1, r2) = (f(), f());
    take(&r1, Access::Read).unwrap();
    take(&r2, Access::Read).unwrap();
    let err = take(&f(), Access::Write).unwrap_err();
    assert!(err.contains("does not let others write it"), "{err}");
    drop((r1, r2));
    take(&f(), Access::Write).unwrap();
}

#[test]
fn a_disk_is_exclusive_for_writers_and_shared_by_readers() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let w = open(&p, Access::Write).unwrap();
    // flock answers first; its holder is this very process.
    let twice = "is already open in this VM (the same disk given twice?)";
    assert_eq!(refusal(&p, Access::Write), twice);
    assert_eq!(refusal(&p, Access::Read), twice);
    drop(w);
    let r1 = open(&p, Access::Read).unwrap();
    let _r2 = open(&p, Access::Read).unwrap();
    assert_eq!(refusal(&p, Access::Write), twice);
    drop(r1);
}

#[test]
fn a_symlink_is_followed_and_the_lock_is_on_its_target() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&p, &link).unwrap();
    let _w = open(&link, Access::Write).unwrap();
    assert!(refusal(&p, Access::Write).starts_with("is already open in this VM"));
}

/// A child process (`sleep`) that inherits an open file description with
/// QEMU-style locks on `bytes`, which then only the child holds.
struct LockHolder(Child);

impl LockHolder {
    fn start(path: &Path, bytes: &[i64]) -> LockHolder {
        let file = File::open(path).unwrap();
        for &b in bytes {
            ofd::lock_byte(&file, b).unwrap();
        }
        Self::keep(file, false)
    }

    /// Runs `sleep` with `file`'s description inherited (and, with
    /// `classic_read_lock`, a classic whole-file read lock of its own on
    /// it), so that only the child holds what is locked there.
    // F_RDLCK and SEEK_SET fit a c_short.
    #[allow(clippy::cast_possible_truncation)]
    fn keep(file: File, classic_read_lock: bool) -> LockHolder {
        let fd = file.as_raw_fd();
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        // SAFETY: between fork and exec the closure only calls fcntl, which
        // is async-signal-safe, on a descriptor this process owns; the
        // flock struct lives on the closure's stack for the call.
        unsafe {
            cmd.pre_exec(move || {
                // Kept across exec: closing it would drop the locks.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if classic_read_lock {
                    let mut fl: libc::flock = std::mem::zeroed();
                    fl.l_type = libc::F_RDLCK as libc::c_short;
                    fl.l_whence = libc::SEEK_SET as libc::c_short;
                    if libc::fcntl(fd, libc::F_SETLK, &fl) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("cannot run sleep");
        // The child keeps the description (and its locks) open.
        drop(file);
        LockHolder(child)
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_qemu_writer_in_another_process_is_refused_and_named() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    // qemu-io's writer: 100-101, sharing everything.
    let holder = LockHolder::start(&p, &[100, 101]);
    let pid = holder.0.id();
    for access in [Access::Write, Access::Read] {
        let err = refusal(&p, access);
        assert_eq!(
            err,
            format!("is in use by another process that writes it (pid {pid}, sleep)")
        );
    }
    drop(holder);
    open(&p, Access::Write).unwrap();
}

#[test]
fn a_qemu_reader_shares_with_readers_only() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    let holder = LockHolder::start(&p, &[100, 201]);
    let err = refusal(&p, Access::Write);
    assert_eq!(
        err,
        format!(
            "is in use by another process that does not let others write it (pid {}, sleep)",
            holder.0.id()
        )
    );
    let _r = open(&p, Access::Read).unwrap();
}

#[test]
fn a_whole_file_write_lock_refuses_both() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    // Cloud Hypervisor's `lock_granularity=full` writer, here in-process.
    let other = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    whole_file_write_lock(&other);
    for access in [Access::Write, Access::Read] {
        let err = refusal(&p, access);
        assert!(
            err.starts_with("is in use by another process that locks it for writing (pid "),
            "{err}"
        );
    }
}

/// A child process (`sleep`) holding a classic (POSIX, per-process)
/// whole-file read lock: what flock(LOCK_SH) becomes on NFS and 9p, and
/// what a whole-file reader holds.
fn classic_whole_file_reader(path: &Path) -> LockHolder {
    LockHolder::keep(File::open(path).unwrap(), true)
}

#[test]
fn a_whole_file_reader_shares_with_readers_and_refuses_writers() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    // Two VMs on one read-only root on 9p: the first one's flock(LOCK_SH)
    // is such a lock, and the second must still start.
    let holder = classic_whole_file_reader(&p);
    drop(open(&p, Access::Read).unwrap());
    let err = refusal(&p, Access::Write);
    assert_eq!(
        err,
        format!(
            "is in use by another process that does not let others write it (pid {}, sleep)",
            holder.0.id()
        )
    );
}

#[test]
// F_WRLCK and SEEK_SET fit a c_short.
#[allow(clippy::cast_possible_truncation)]
fn our_own_classic_whole_file_lock_is_no_conflict() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    // What flock(LOCK_EX) becomes on NFS or 9p: a classic write lock of
    // this very process, taken before the image bytes.
    let file = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let meta = file.metadata().unwrap();
    // SAFETY: flock is a plain C struct for which all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_SETLK reads one flock, which outlives the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) };
    assert_eq!(ret, 0, "{}", io::Error::last_os_error());
    take_image_locks(&file, &meta, Access::Write).unwrap();
}

// F_WRLCK and SEEK_SET fit a c_short.
#[allow(clippy::cast_possible_truncation)]
fn whole_file_write_lock(file: &File) {
    // SAFETY: flock is a plain C struct for which all-zero is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK reads one flock, which outlives the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(ret, 0, "{}", io::Error::last_os_error());
}

#[test]
fn locks_end_with_the_descriptor() {
    let dir = TempDir::new();
    let p = image(&dir, "a.img");
    for _ in 0..3 {
        let c = open(&p, Access::Write).unwrap();
        assert!(c.meta.is_file());
    }
}

#[test]
fn only_regular_files_and_block_devices_are_disks() {
    let dir = TempDir::new();
    assert_eq!(
        refusal(dir.path(), Access::Write),
        "is a directory, not a regular file or block device"
    );
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Never opened: a read-only open of a FIFO would wait for a writer.
    assert_eq!(
        refusal(&fifo, Access::Read),
        "is a FIFO, not a regular file or block device"
    );
    assert_eq!(
        refusal(Path::new("/dev/null"), Access::Write),
        "is a character device, not a regular file or block device"
    );
    let sock = dir.path().join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert_eq!(
        refusal(&sock, Access::Write),
        "is a socket, not a regular file or block device"
    );
    let e = open(&dir.path().join("missing"), Access::Read).unwrap_err();
    assert!(matches!(e, ClaimError::Open(_)), "{e}");
}

#[test]
fn parses_proc_locks() {
    let locks = "\
1: POSIX  ADVISORY  WRITE 77 fe:00:42 0 EOF
2: FLOCK  ADVISORY  WRITE 3736 fe:00:5308498 0 EOF
3: -> FLOCK  ADVISORY  WRITE 99 fe:00:42 0 EOF
4: FLOCK  ADVISORY  READ 26420 08:11:42 0 EOF
5: FLOCK  ADVISORY  WRITE 1234 fe:00:42 0 EOF
6: OFDLCK ADVISORY  READ -1 fe:00:42 100 101
";
    let dev_fe00 = 0xfe00;
    assert_eq!(find_flock_holder(locks, dev_fe00, 42, 1), Some(1234));
    assert_eq!(find_flock_holder(locks, dev_fe00, 5308498, 1), Some(3736));
    assert_eq!(find_flock_holder(locks, 0x0811, 42, 1), Some(26420));
    assert_eq!(find_flock_holder(locks, dev_fe00, 43, 1), None);
    assert_eq!(
        find_flock_holder(locks, dev_fe00, 42, 1234),
        Some(1234),
        "our own lock"
    );
    assert_eq!(find_flock_holder("garbage\n\n1:\n", dev_fe00, 42, 1), None);
}

#[test]
fn parses_fdinfo_lock_lines() {
    let info = "pos:\t0\nflags:\t0100002\nmnt_id:\t26\nino:\t10010663\n\
                lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010663 100 101\n\
                lock:\t2: OFDLCK ADVISORY  WRITE -1 fe:00:10010663 0 EOF\n";
    let l = LockLine::parse("lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010663 100 101").unwrap();
    assert_eq!(
        l,
        LockLine {
            class: "OFDLCK".into(),
            write: false,
            pid: None,
            file: "fe:00:10010663".into(),
            start: 100,
            end: Some(101),
        }
    );
    let read_at = |start| Found {
        write: false,
        start,
        len: 1,
        pid: None,
    };
    let id = "fe:00:10010663";
    assert!(fdinfo_holds(info, id, &read_at(101)));
    assert!(!fdinfo_holds(info, id, &read_at(201)));
    assert!(!fdinfo_holds(info, "fe:00:1", &read_at(100)));
    let whole = Found {
        write: true,
        start: 0,
        len: 0,
        pid: None,
    };
    assert!(fdinfo_holds(info, id, &whole));
    assert_eq!(lock_file_id(0xfe00, 10010663), id);
}

#[test]
fn dev_t_split_matches_glibc() {
    // glibc's makedev, with both halves of both numbers in use.
    let (major, minor): (u64, u64) = (0x1_2345, 0x67_89ab);
    let dev = make_dev(major, minor);
    assert_eq!(
        dev,
        (major & 0xfff) << 8 | (major & !0xfff) << 32 | (minor & 0xff) | (minor & !0xff) << 12
    );
    assert_eq!(dev_major(dev), major);
    assert_eq!(dev_minor(dev), minor);
}

#[test]
fn finds_mount_points() {
    let info = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 22 7:3 / /mnt/my\\040disk rw,relatime shared:2 - ext4 /dev/loop3 rw
";
    assert_eq!(mount_point(info, 7, 3).as_deref(), Some("/mnt/my disk"));
    assert_eq!(mount_point(info, 254, 0).as_deref(), Some("/"));
    assert_eq!(mount_point(info, 7, 4), None);
}

/// A fake /sys: loop3 on /x/data.img with a partition, loop4 on a deleted
/// file, dm-0 stacked on loop3.
fn fake_sysfs(dir: &TempDir) -> Sysfs {
    let root = dir.path();
    let blk = root.join("devices/virtual/block");
    let w = |rel: &str, text: &str| {
        let p = blk.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    w("loop3/dev", "7:3\n");
    w("loop3/loop/backing_file", "/x/data.img\n");
    w("loop3/loop3p1/dev", "259:0\n");
    w("loop3/loop3p1/partition", "1\n");
    w("loop4/dev", "7:4\n");
    w("loop4/loop/backing_file", "/x/old.img (deleted)\n");
    w("dm-0/dev", "253:0\n");
    std::fs::create_dir_all(blk.join("dm-0/slaves")).unwrap();
    std::fs::create_dir_all(blk.join("loop3/holders")).unwrap();
    let link = |from: &str, to: &Path| std::os::unix::fs::symlink(to, root.join(from)).unwrap();
    std::fs::create_dir_all(root.join("dev/block")).unwrap();
    link("dev/block/7:3", &blk.join("loop3"));
    link("dev/block/7:4", &blk.join("loop4"));
    link("dev/block/259:0", &blk.join("loop3/loop3p1"));
    link("dev/block/253:0", &blk.join("dm-0"));
    link(
        "devices/virtual/block/dm-0/slaves/loop3",
        &blk.join("loop3"),
    );
    link(
        "devices/virtual/block/loop3/holders/dm-0",
        &blk.join("dm-0"),
    );
    Sysfs::with_root(root)
}

#[test]
fn follows_loop_devices_partitions_and_stacks_in_sysfs() {
    let dir = TempDir::new();
    let sys = fake_sysfs(&dir);
    let direct = Backing {
        loop_name: "loop3".into(),
        path: "/x/data.img".into(),
        direct: true,
    };
    assert_eq!(sys.backing_files(7, 3).unwrap(), vec![direct.clone()]);
    assert_eq!(sys.backing_files(259, 0).unwrap(), vec![direct.clone()]);
    assert_eq!(
        sys.backing_files(253, 0).unwrap(),
        [Backing {
            direct: false,
            ..direct
        }]
    );
    let e = sys.backing_files(7, 4).unwrap_err().to_string();
    assert_eq!(
        e,
        "its loop device loop4 reads a deleted file (/x/old.img), which ksmvm cannot check"
    );
    assert!(matches!(
        sys.backing_files(8, 0),
        Err(StackError::Sysfs { .. })
    ));
    let mut related = sys.related(259, 0);
    related.sort_unstable();
    assert_eq!(related, [(7, 3), (259, 0)]);
    assert_eq!(sys.holders(7, 3), ["dm-0"]);
    assert!(sys.holders(253, 0).is_empty());
}

#[test]
fn error_messages_complete_the_sentence() {
    let e = ClaimError::Backing {
        via: "a loop device on".into(),
        backing: "/x/data.img".into(),
        source: Box::new(ClaimError::InUse(InUse::Flock(42))),
    };
    assert_eq!(
        e.to_string(),
        "is a loop device on /x/data.img, which is in use by another VM (lock held by pid 42)"
    );
    let h = MaybeHolder(None);
    assert_eq!(
        InUse::Bytes {
            meaning: "writes it",
            holder: h
        }
        .to_string(),
        "in use by another process that writes it (holder not found)"
    );
}
