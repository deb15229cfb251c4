//! The server's limits, on a real Unix socket (no VM needed).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;

struct Server {
    _http: HttpServer,
    path: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn server(tag: &str, limits: Limits) -> Server {
    let path = std::env::temp_dir().join(format!("ksmvm-http-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let handler: Handler = Arc::new(|_: &str, _: &str, body: &[u8]| {
        Reply::text("text/plain", format!("{} bytes", body.len()))
    });
    let http =
        HttpServer::spawn_with(ThreadKind::Api, Listener::Unix(listener), handler, limits).unwrap();
    Server { _http: http, path }
}

/// The status line of the first response on `s`, or None on timeout/EOF.
fn status_line(s: &mut UnixStream, timeout: Duration) -> Option<String> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.lines()
        .next()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
}

#[test]
fn a_trickled_body_gets_408_in_time() {
    let srv = server(
        "body",
        Limits {
            body_read: Duration::from_millis(300),
            ..Limits::default()
        },
    );
    let mut c = UnixStream::connect(&srv.path).unwrap();
    c.write_all(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\nab")
        .unwrap();
    let t0 = Instant::now();
    let line = status_line(&mut c, Duration::from_secs(5));
    assert_eq!(line.as_deref(), Some("HTTP/1.1 408 Request Timeout"));
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // A body that arrives in time is served.
    let mut c = UnixStream::connect(&srv.path).unwrap();
    c.write_all(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
        .unwrap();
    let line = status_line(&mut c, Duration::from_secs(5));
    assert_eq!(line.as_deref(), Some("HTTP/1.1 200 OK"));
}

#[test]
fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let srv = server(
        "cap",
        Limits {
            max_connections: 2,
            ..Limits::default()
        },
    );
    // Two clients that connect and never send hold both slots.
    let silent: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(&srv.path).unwrap())
        .collect();
    // Give the server time to accept them.
    std::thread::sleep(Duration::from_millis(200));
    let mut third = UnixStream::connect(&srv.path).unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(
        status_line(&mut third, Duration::from_millis(500)),
        None,
        "served beyond the cap"
    );
    // One slot frees: the waiting client is served.
    drop(silent);
    let line = status_line(&mut third, Duration::from_secs(5));
    assert_eq!(line.as_deref(), Some("HTTP/1.1 200 OK"));
}

#[test]
fn accept_failures_are_logged_a_few_per_window_with_a_count() {
    let mut log = AcceptLog::default();
    let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
    let t0 = Instant::now();
    // A flood: one failure per back-off for a whole window.
    let per_window = ACCEPT_LOG_WINDOW.as_millis() / ACCEPT_BACKOFF.as_millis();
    let per_window = u32::try_from(per_window).unwrap();
    let logged: Vec<String> = (0..per_window)
        .filter_map(|i| log.failed(&emfile, t0 + ACCEPT_BACKOFF * i))
        .collect();
    assert_eq!(logged.len(), ACCEPT_LOG_BURST as usize, "{logged:?}");
    assert!(
        logged[0].starts_with("cannot accept a connection: Too many open files"),
        "{}",
        logged[0]
    );
    // The next window's first warning counts what the last one held back.
    let held_back = per_window - ACCEPT_LOG_BURST;
    let next = log.failed(&emfile, t0 + ACCEPT_LOG_WINDOW).unwrap();
    assert!(
        next.ends_with(&format!("({held_back} more failed accepts not logged)")),
        "{next}"
    );
    // Accepting again ends the run, once.
    assert_eq!(
        log.accepted().as_deref(),
        Some(
            format!(
                "accepting connections again after {} failed accepts",
                per_window + 1
            )
            .as_str()
        )
    );
    assert_eq!(log.accepted(), None);
}
