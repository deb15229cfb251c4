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

/// What ksmvm puts before every guest line on a stdout that is not a
/// terminal (ksmvm::devices::serial::GUEST_LINE_PREFIX).
pub const GUEST_LINE_PREFIX: &str = "guest: ";

/// A line of serial output and when it arrived.
#[derive(Debug, Clone)]
pub struct SerialLine {
    pub at: Instant,
    /// The guest's line, without ksmvm's [`GUEST_LINE_PREFIX`].
    pub text: String,
    /// Whether the line carried the prefix (every guest line from ksmvm;
    /// not what ksmvm itself prints on stdout, such as the exporter's
    /// address, nor another VMM's output).
    pub marked: bool,
}

impl SerialLine {
    /// A line as read (without its `\r`), its prefix taken off.
    fn new(at: Instant, raw: &[u8]) -> SerialLine {
        let raw = String::from_utf8_lossy(raw);
        let raw = raw.trim_end_matches('\r');
        match raw.strip_prefix(GUEST_LINE_PREFIX) {
            Some(text) => SerialLine {
                at,
                text: text.to_owned(),
                marked: true,
            },
            None => SerialLine {
                at,
                text: raw.to_owned(),
                marked: false,
            },
        }
    }
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
/// whole lines (without `\r` and ksmvm's `guest: ` marker), each stamped
/// with its arrival time.
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
                    let l = SerialLine::new(at, &line);
                    line.clear();
                    if tx.send(l).is_err() {
                        return;
                    }
                } else {
                    line.push(b);
                }
            }
        }
        if !line.is_empty() {
            let _ = tx.send(SerialLine::new(Instant::now(), &line));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_marker_is_taken_off_and_remembered() {
        let now = Instant::now();
        let l = SerialLine::new(now, b"guest: PROBE READY\r");
        assert_eq!((l.text.as_str(), l.marked), ("PROBE READY", true));
        let l = SerialLine::new(now, b"ksmvm exporter listening on http://x/metrics");
        assert!(!l.marked);
        assert_eq!(l.text, "ksmvm exporter listening on http://x/metrics");
        let l = SerialLine::new(now, b"guest: guest: twice");
        assert_eq!(l.text, "guest: twice", "only ksmvm's own marker");
    }
}
