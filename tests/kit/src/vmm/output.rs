//! A VMM's output: serial lines read from its stdout, stderr kept, and
//! what a wait for a line can end in.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::Instant;

/// A line of serial output and when it arrived.
#[derive(Debug, Clone)]
pub struct SerialLine {
    pub at: Instant,
    pub text: String,
}

/// Why a wait for a serial line (or for an exit) ended without it.
#[derive(Debug)]
pub enum WaitError {
    /// Nothing matched within the time allowed.
    Timeout,
    /// The VMM closed its output (it exited) first.
    Exited(Option<ExitStatus>),
    /// The probe reported an error (the line).
    ProbeError(String),
    /// The caller's interrupt flag was raised.
    Interrupted,
    /// Writing to the serial input failed.
    Io(io::Error),
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::Timeout => f.write_str("timed out"),
            WaitError::Exited(Some(st)) => write!(f, "the VMM exited ({st})"),
            WaitError::Exited(None) => f.write_str("the VMM exited (unknown status)"),
            WaitError::ProbeError(l) => write!(f, "the guest reported {l:?}"),
            WaitError::Interrupted => f.write_str("interrupted"),
            WaitError::Io(e) => write!(f, "serial input: {e}"),
        }
    }
}

impl std::error::Error for WaitError {}

impl From<io::Error> for WaitError {
    fn from(e: io::Error) -> Self {
        WaitError::Io(e)
    }
}

/// What a wait looks for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pattern<'a> {
    Prefix(&'a str),
    Contains(&'a str),
}

impl Pattern<'_> {
    fn text(self) -> &'static str {
        match self {
            Pattern::Prefix(_) => "starting with",
            Pattern::Contains(_) => "containing",
        }
    }

    pub(super) fn matches(self, line: &str) -> bool {
        match self {
            Pattern::Prefix(p) => line.starts_with(p),
            Pattern::Contains(n) => line.contains(n),
        }
    }

    pub(super) fn wants_probe_error(self) -> bool {
        match self {
            Pattern::Prefix(s) | Pattern::Contains(s) => s.starts_with("PROBE ERROR"),
        }
    }
}

impl fmt::Display for Pattern<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Prefix(s) | Pattern::Contains(s) => write!(f, "{} {s:?}", self.text()),
        }
    }
}

/// Reads the serial console: records the first byte's arrival and sends
/// whole lines (without `\r`), each stamped with its arrival time.
pub(super) fn read_serial(
    mut out: impl Read + Send + 'static,
    first: Arc<OnceLock<Instant>>,
) -> Receiver<SerialLine> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        loop {
            let n = match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let at = Instant::now();
            let _ = first.set(at);
            for &b in &buf[..n] {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string();
                    line.clear();
                    if tx.send(SerialLine { at, text }).is_err() {
                        return;
                    }
                } else {
                    line.push(b);
                }
            }
        }
        if !line.is_empty() {
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            let _ = tx.send(SerialLine {
                at: Instant::now(),
                text,
            });
        }
    });
    rx
}

/// Keeps every stderr line (and echoes it if asked); raises `done` at EOF.
pub(super) fn read_stderr(
    err: impl Read + Send + 'static,
    keep: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicBool>,
    echo: bool,
) {
    thread::spawn(move || {
        for line in BufReader::new(err).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if echo {
                eprintln!("{line}");
            }
            keep.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(line);
        }
        done.store(true, Ordering::SeqCst);
    });
}
