//! A small stderr logger. Under systemd (JOURNAL_STREAM set) each line gets
//! the `<N>` priority prefix journald understands.

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

/// Installs the logger once; later calls only change the level.
pub fn init(level: LevelFilter) {
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = log::set_boxed_logger(Box::new(Logger { journald }));
    log::set_max_level(level);
}
