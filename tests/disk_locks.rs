//! Disk locks that follow the data, end to end: real VMMs with the probe
//! guest, refused (exit 2, one error line naming the disk and, where it can
//! be found, the holder) when another VM or QEMU uses the same data, by
//! whatever name: the image, a loop device over it, a `mknod` alias of that
//! loop device. Loop devices, mounts and mknod need root (see
//! `blockdev::have_loop_devices`); everything they make is undone on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ksmvm_testkit::blockdev::*;
use ksmvm_testkit::*;

const T: Duration = Duration::from_secs(60);

fn image(dir: &TempDir, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(4 << 20))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    p
}

fn disk(path: &Path, ro: bool) -> String {
    format!("path={}{}", path.display(), if ro { ",ro=on" } else { "" })
}

fn vmm(disk: &str, name: &str) -> Vmm {
    Vmm::probe("", &["--mem-mib", "64", "--disk", disk, "--name", name])
}

/// A VMM that boots and keeps the disk.
fn running(disk: &str, name: &str) -> Vmm {
    let mut vm = vmm(disk, name);
    vm.expect_line("PROBE READY", T);
    vm
}

/// A VMM that is refused: exit 2 and one error line, which is returned.
fn refused(disk: &str, name: &str) -> String {
    let (status, stderr) = vmm(disk, name).wait(T);
    assert_eq!(status.code(), Some(2), "--disk {disk}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line: {stderr}");
    errors[0].to_owned()
}

#[test]
fn a_second_writer_is_refused_and_qemu_sees_a_writer() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("lk-two");
    let img = image(&dir, "data.img");
    let first = running(&disk(&img, false), "w1");
    let err = refused(&disk(&img, false), "w2");
    assert!(
        err.contains(&format!(
            "disk image {} is in use by another VM (lock held by pid {})",
            img.display(),
            first.pid()
        )),
        "{err}"
    );
    // The lock bytes of a QEMU virtio-blk writer, beside the flock.
    let locks = locks_on(&img);
    for want in [
        "OFDLCK ADVISORY READ -1",
        "100 101",
        "201 201",
        &format!("FLOCK ADVISORY WRITE {}", first.pid()),
    ] {
        assert!(locks.iter().any(|l| l.contains(want)), "{want}: {locks:?}");
    }
    if require(have_program("qemu-io"), "qemu-io (QEMU's qemu-utils)") {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 512"])
            .arg(&img)
            .output()
            .expect("run qemu-io");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "qemu-io wrote beside ksmvm: {err}");
        assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    }
    first.poweroff();
}

#[test]
fn a_qemu_writer_in_another_process_is_refused_and_named() {
    if !have_kvm() || !require(have_program("qemu-io"), "qemu-io (QEMU's qemu-utils)") {
        return;
    }
    let dir = TempDir::new("lk-qemu");
    let img = image(&dir, "data.img");
    // qemu-io holds a writer's locks while it sleeps; killed on drop.
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "raw", "-c", "sleep 120000"]).arg(&img);
    let qemu = Vmm::spawn_command(&mut cmd, false).expect("start qemu-io");
    wait_for_lock(&img, "100 101", T);
    for ro in [false, true] {
        let err = refused(&disk(&img, ro), "q");
        assert!(
            err.contains(&format!(
                "disk image {} is in use by another process that writes it (pid {}, qemu-io)",
                img.display(),
                qemu.pid()
            )),
            "{err}"
        );
    }
}

#[test]
fn a_qemu_reader_shares_with_readers_and_refuses_writers() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("lk-qemu-r");
    let img = image(&dir, "data.img");
    // A small helper takes the lock bytes of a QEMU reader.
    let reader = ImageLockHolder::start(&img, QEMU_READER_BYTES);
    let err = refused(&disk(&img, false), "w");
    assert!(
        err.contains(&format!(
            "disk image {} is in use by another process that does not let others write it (pid {}, sleep)",
            img.display(),
            reader.pid()
        )),
        "{err}"
    );
    running(&disk(&img, true), "r").poweroff();
    drop(reader);
    // And a QEMU writer's bytes refuse a reader.
    let writer = ImageLockHolder::start(&img, QEMU_WRITER_BYTES);
    let err = refused(&disk(&img, true), "r");
    assert!(err.contains("another process that writes it"), "{err}");
    drop(writer);
}

#[test]
fn a_read_only_disk_is_shared_by_two_vmms_and_refuses_a_writer() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("lk-ro");
    let img = image(&dir, "base.img");
    let r1 = running(&disk(&img, true), "r1");
    let r2 = running(&disk(&img, true), "r2");
    let err = refused(&disk(&img, false), "w");
    assert!(
        err.contains("is in use by another VM (lock held by pid "),
        "{err}"
    );
    r1.poweroff();
    r2.poweroff();
}

#[test]
fn a_directory_fifo_socket_or_char_device_is_no_disk() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("lk-kind");
    let fifo = dir.join("fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(st.success());
    let link = dir.join("link");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    let sock = dir.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    for (path, kind) in [
        (dir.path(), "a directory"),
        (fifo.as_path(), "a FIFO"),
        // A symlink is followed: what counts is what it names.
        (link.as_path(), "a FIFO"),
        (sock.as_path(), "a socket"),
        (Path::new("/dev/null"), "a character device"),
    ] {
        for ro in [false, true] {
            let err = refused(&disk(path, ro), "k");
            assert!(
                err.contains(&format!(
                    "cannot open disk {}: it is {kind}, not a regular file or block device",
                    path.display()
                )),
                "{err}"
            );
        }
    }
}

#[test]
fn an_image_and_a_loop_device_over_it_refuse_each_other() {
    if !have_kvm() || !have_loop_devices() {
        return;
    }
    let dir = TempDir::new("lk-loop");
    let img = image(&dir, "data.img");
    let lo = LoopDev::new(&img);
    let on_loop = disk(lo.path(), false);

    let vm = running(&disk(&img, false), "img");
    let err = refused(&on_loop, "loop");
    assert!(
        err.contains(&format!(
            "disk image {} is a loop device on {}, which is in use by another VM (lock held by pid {})",
            lo.path().display(),
            img.display(),
            vm.pid()
        )),
        "{err}"
    );
    // A reader on the loop device is refused too.
    refused(&disk(lo.path(), true), "loop-r");
    vm.poweroff();

    let vm = running(&on_loop, "loop");
    let err = refused(&disk(&img, false), "img");
    assert!(
        err.contains(&format!(
            "disk image {} is in use by another VM (lock held by pid {})",
            img.display(),
            vm.pid()
        )),
        "{err}"
    );
    // QEMU's bytes are on the image too, not only on the loop device.
    assert!(
        locks_on(&img).iter().any(|l| l.contains("201 201")),
        "{:?}",
        locks_on(&img)
    );
    vm.poweroff();
}

#[test]
fn a_mknod_alias_of_a_loop_device_is_refused() {
    if !have_kvm() || !have_loop_devices() {
        return;
    }
    let dir = TempDir::new("lk-alias");
    let img = image(&dir, "data.img");
    let lo = LoopDev::new(&img);
    let alias = dir.join("alias");
    mknod_alias(&alias, lo.dev());

    let vm = running(&disk(lo.path(), false), "loop");
    for ro in [false, true] {
        let err = refused(&disk(&alias, ro), "alias");
        assert!(
            err.contains(&format!(
                "disk image {} is opened exclusively by another process (pid {}, ksmvm)",
                alias.display(),
                vm.pid()
            )),
            "{err}"
        );
    }
    vm.poweroff();
    // Once the first VM is gone, the alias is a disk like the device.
    running(&disk(&alias, false), "alias").poweroff();
}

#[test]
fn a_mounted_block_device_is_refused() {
    if !have_kvm()
        || !have_loop_devices()
        || !require(have_program("mkfs.ext4"), "mkfs.ext4 (e2fsprogs)")
    {
        return;
    }
    let dir = TempDir::new("lk-mnt");
    let img = image(&dir, "fs.img");
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .expect("mkfs.ext4");
    assert!(st.success());
    let lo = LoopDev::new(&img);
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount = Mount::new(lo.path(), &mnt);
    let err = refused(&disk(lo.path(), false), "m");
    assert!(
        err.contains(&format!(
            "disk image {} is mounted on the host at {}",
            lo.path().display(),
            mnt.display()
        )),
        "{err}"
    );
    drop(mount);
    running(&disk(lo.path(), false), "m").poweroff();
}

/// A VMM given the same data twice, by any names, is refused.
fn refused_twice(first: &str, second: &str) -> String {
    let args = [
        "--mem-mib",
        "64",
        "--disk",
        first,
        "--disk",
        second,
        "--name",
        "twice",
    ];
    let (status, stderr) = Vmm::probe("", &args).wait(T);
    assert_eq!(status.code(), Some(2), "{first} + {second}: {stderr}");
    stderr
}

#[test]
fn the_same_data_given_twice_to_one_vmm_is_refused() {
    if !have_kvm() {
        return;
    }
    let dir = TempDir::new("lk-twice");
    let img = image(&dir, "data.img");
    let link = dir.join("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let twice = "is already open in this VM (the same disk given twice?)";
    for (a, b) in [
        (disk(&img, false), disk(&img, false)),
        (disk(&img, true), disk(&link, false)),
    ] {
        let err = refused_twice(&a, &b);
        assert!(err.contains(twice), "{err}");
    }
    if !have_loop_devices() {
        return;
    }
    let lo = LoopDev::new(&img);
    let alias = dir.join("alias");
    mknod_alias(&alias, lo.dev());
    let err = refused_twice(&disk(&img, false), &disk(lo.path(), false));
    assert!(
        err.contains(&format!(
            "disk image {} is a loop device on {}, which {twice}",
            lo.path().display(),
            img.display()
        )),
        "{err}"
    );
    let err = refused_twice(&disk(lo.path(), false), &disk(&alias, true));
    assert!(
        err.contains(&format!("disk image {} {twice}", alias.display())),
        "{err}"
    );
}
