//! A small stderr logger. Under systemd (JOURNAL_STREAM set) each line gets
//! the `<N>` priority prefix journald understands; elsewhere it starts with
//! `ksmvm: LEVEL: `. Guest serial output on stdout is marked `guest: `
//! instead (devices::serial), so the two cannot be mistaken for each other.
//! [`warn_ratelimited!`](crate::warn_ratelimited) is for conditions an
//! outsider can repeat at will.

mod ratelimit;

pub use ratelimit::{RateLimiter, Verdict};

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

struct Logger {
    journald: bool,
}

fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = if self.journald {
            format!("<{}>{}\n", syslog_priority(r.level()), r.args())
        } else {
            format!(
                "ksmvm: {}: {}\n",
                r.level().as_str().to_lowercase(),
                r.args()
            )
        };
        // One write per line so lines from several threads never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Whether `fd` is the journal stream systemd set up: JOURNAL_STREAM is
/// inherited by children whose output may go elsewhere, so compare its
/// `device:inode` with the fd's, as systemd.exec(5) advises.
pub fn is_journal_stream(fd: impl std::os::fd::AsFd) -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    match nix::sys::stat::fstat(fd) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

fn stderr_is_journal() -> bool {
    is_journal_stream(std::io::stderr())
}

/// Prints a line that ends the program (an error the user must see at any
/// log level), as an error-priority line under journald.
pub fn fatal(msg: &str) {
    let line = if stderr_is_journal() {
        format!("<{}>{msg}\n", syslog_priority(Level::Error))
    } else {
        format!("{msg}\n")
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Installs the logger once; later calls only change the level.
pub fn init(level: LevelFilter) {
    uptime_ms();
    let journald = stderr_is_journal();
    let _ = log::set_boxed_logger(Box::new(Logger { journald }));
    log::set_max_level(level);
}

/// Milliseconds since the process started (its first log call, in
/// practice `init`), for the boot timeline at debug level.
pub fn uptime_ms() -> f64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64()
        * 1000.0
}

/// Logs a boot milestone at debug level with the time since start.
#[macro_export]
macro_rules! milestone {
    ($($arg:tt)*) => {
        log::debug!("[{:8.3} ms] {}", $crate::logger::uptime_ms(), format_args!($($arg)*))
    };
}
