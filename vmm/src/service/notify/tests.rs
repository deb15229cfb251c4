//! A fake $NOTIFY_SOCKET: the datagrams arrive, at a path and at an
//! abstract name, and still do with the process at its fd limit.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;

/// A unique abstract socket name for this test process.
fn abstract_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "ksmvm-notify-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A receiver bound to `@name`, and a notifier for it.
fn fake_systemd(tag: &str) -> (UnixDatagram, Notifier) {
    let name = abstract_name(tag);
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let rx = UnixDatagram::bind_addr(&addr).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = Notifier::new(&OsString::from(format!("@{name}"))).unwrap();
    (rx, n)
}

fn recv(rx: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let len = rx.recv(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[test]
fn notifications_reach_an_abstract_socket_as_one_datagram_each() {
    let (rx, n) = fake_systemd("abstract");
    n.send(&[NotifyState::Ready, NotifyState::Status("running; 64 MiB")])
        .unwrap();
    n.send(&[NotifyState::Watchdog]).unwrap();
    assert_eq!(recv(&rx), "READY=1\nSTATUS=running; 64 MiB\n");
    assert_eq!(recv(&rx), "WATCHDOG=1\n");
}

#[test]
fn notifications_reach_a_socket_file_and_survive_its_re_creation() {
    let dir = std::env::temp_dir().join(format!("ksmvm-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let rx = UnixDatagram::bind(&path).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = Notifier::new(path.as_os_str()).unwrap();
    n.send(&[
        NotifyState::Stopping,
        NotifyState::ExtendTimeoutUsec(40_000_000),
    ])
    .unwrap();
    assert_eq!(recv(&rx), "STOPPING=1\nEXTEND_TIMEOUT_USEC=40000000\n");
    // systemd re-executing binds a new socket at the same path.
    drop(rx);
    std::fs::remove_file(&path).unwrap();
    assert!(n.send(&[NotifyState::Watchdog]).is_err(), "nobody listens");
    let rx = UnixDatagram::bind(&path).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    n.send(&[NotifyState::Watchdog]).unwrap();
    assert_eq!(recv(&rx), "WATCHDOG=1\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn other_notify_socket_values_are_refused() {
    for bad in ["", "relative/notify", "vsock:2:1234"] {
        let e = Notifier::new(OsStr::new(bad)).unwrap_err();
        assert!(matches!(e, NotifyError::Unsupported(_)), "{bad}: {e}");
    }
}

/// Set in the child process that runs the fd-exhaustion half of the test.
const CHILD_ENV: &str = "KSMVM_TEST_NOTIFY_FD_CHILD";

/// RLIMIT_NOFILE is per process: the fd half runs in a child process (this
/// test binary again, running only this test), so that no other test of
/// this process finds itself without fds.
#[test]
fn notifications_still_go_out_at_the_fd_limit() {
    let name = format!(
        "{}::notifications_still_go_out_at_the_fd_limit",
        module_path!().trim_start_matches("ksmvm::")
    );
    if std::env::var_os(CHILD_ENV).is_some() {
        exhaust_fds_then_notify();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {:?}:\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("at the fd limit: notified"), "{stdout}");
}

fn exhaust_fds_then_notify() {
    let (rx, n) = fake_systemd("emfile");
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct; this process
    // runs only this test.
    let rc = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(256);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim)
    };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
    // Open files until the process has no fd left.
    let mut hold = Vec::new();
    let err = loop {
        match File::open("/dev/null") {
            Ok(f) => hold.push(f),
            Err(e) => break e,
        }
        assert!(hold.len() < 100_000, "the fd limit did not apply");
    };
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "{err}");
    // What the sd-notify crate does for every notification fails here...
    let e = UnixDatagram::unbound().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "{e}");
    // ...and the socket opened at start still works.
    for _ in 0..3 {
        n.send(&[NotifyState::Watchdog]).unwrap();
        assert_eq!(recv(&rx), "WATCHDOG=1\n");
    }
    drop(hold);
    println!("at the fd limit: notified");
}
