//! Where guest serial output goes, and its bounds: a guest can write to
//! its UART as fast as it can exit to the VMM, forever, and whatever it
//! writes lands in the host's journal or on its disk.
//!
//! * [`RateLimited`]: a token bucket (bytes per second, with a burst);
//!   bytes beyond it are dropped, counted in [`SerialStats`] and reported
//!   by a warning at most every [`DROP_REPORT_INTERVAL`].
//! * [`MarkedLines`]: on a stdout that is not a terminal (the journal under
//!   systemd, a pipe, a file) every guest line becomes one write of
//!   `guest: LINE\n`. The line can then never start with a `<N>` journald
//!   priority, never look like one of the VMM's own log lines (`<N>MSG`
//!   under journald, `ksmvm: LEVEL: MSG` elsewhere), and never be split by
//!   one of them on a stream the two share.
//! * [`RotatingFile`]: a `file:` sink that keeps at most `max` bytes in
//!   PATH and the previous `max` in PATH.1.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::SerialOut;
use crate::config::{SerialLimits, SerialSink};
use crate::token_bucket::TokenBucket;

/// What marks a guest line on stdout.
pub const GUEST_LINE_PREFIX: &[u8] = b"guest: ";
/// Guest bytes per marked line: a longer line is cut into several, so that
/// each write (prefix and newline included) is at most PIPE_BUF, which a
/// pipe writes atomically, and well below journald's LineMax (48 KiB).
pub const MAX_LINE: usize = 4096 - GUEST_LINE_PREFIX.len() - 1;
/// How often, at most, the VMM warns that it dropped guest output.
pub const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Counters of one serial port's output, shared with whoever reports them
/// (the log now; the statistics API can read them without the device lock).
#[derive(Debug, Default)]
pub struct SerialStats {
    written: AtomicU64,
    dropped: AtomicU64,
    rotations: AtomicU64,
}

/// The serial port's counters as `/stats` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialCounters {
    pub written_bytes: u64,
    /// Dropped by the rate limit (`serial_rate_kib_s`).
    pub dropped_bytes: u64,
    /// Rotations of a `file:` sink at `serial_file_max_mib`.
    pub rotations: u64,
}

impl SerialStats {
    /// A snapshot for `/stats`.
    pub fn counters(&self) -> SerialCounters {
        SerialCounters {
            written_bytes: self.written_bytes(),
            dropped_bytes: self.dropped_bytes(),
            rotations: self.rotations(),
        }
    }

    /// Guest bytes passed on to the sink.
    pub fn written_bytes(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Guest bytes dropped by the rate limit.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// How often a `file:` sink was rotated.
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }
}

/// Drops what the guest writes beyond its [`TokenBucket`] (none with a
/// rate of 0), counting it. Always reports the whole buffer as written:
/// the guest is never slowed down or blocked, and the ready-marker watch
/// above still sees every byte.
pub struct RateLimited {
    inner: SerialOut,
    bucket: Option<TokenBucket>,
    limits: SerialLimits,
    stats: Arc<SerialStats>,
    /// Dropped since the last warning.
    unreported: u64,
    last_report: Option<Instant>,
    last_drop: Option<Instant>,
}

impl RateLimited {
    pub fn new(inner: SerialOut, limits: SerialLimits, stats: Arc<SerialStats>) -> Self {
        Self::new_at(inner, limits, stats, Instant::now())
    }

    pub(super) fn new_at(
        inner: SerialOut,
        limits: SerialLimits,
        stats: Arc<SerialStats>,
        now: Instant,
    ) -> Self {
        Self {
            inner,
            bucket: (limits.rate_bytes_s > 0)
                .then(|| TokenBucket::with_capacity(limits.rate_bytes_s, limits.burst_bytes, now)),
            limits,
            stats,
            unreported: 0,
            last_report: None,
            last_drop: None,
        }
    }

    pub(super) fn write_at(&mut self, buf: &[u8], now: Instant) -> io::Result<usize> {
        let n = match self.bucket.as_mut() {
            // At most `buf.len()`.
            Some(b) => usize::try_from(b.take_up_to(buf.len() as u64, now)).unwrap_or(buf.len()),
            None => buf.len(),
        };
        let dropped = (buf.len() - n) as u64;
        if let Some(msg) = self.count(dropped, now) {
            log::warn!("{msg}");
        }
        self.inner.write_all(&buf[..n])?;
        self.stats.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    /// Counts `dropped` bytes at `now` and returns the warning that is due,
    /// if any: when dropping starts (after [`DROP_REPORT_INTERVAL`] without
    /// drops) at once, then the count at most once per interval.
    pub(super) fn count(&mut self, dropped: u64, now: Instant) -> Option<String> {
        let elapsed = |t: Instant| now.saturating_duration_since(t);
        let earlier = self.unreported;
        if dropped > 0 {
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            self.unreported += dropped;
            let starts = self
                .last_drop
                .is_none_or(|t| elapsed(t) >= DROP_REPORT_INTERVAL);
            self.last_drop = Some(now);
            if starts && earlier == 0 {
                self.last_report = Some(now);
                return Some(format!(
                    "serial: guest output is over its limit ({}); the excess is dropped \
                     (counted here every {} s at most)",
                    self.limit_text(),
                    DROP_REPORT_INTERVAL.as_secs()
                ));
            }
        }
        let since = self.last_report.unwrap_or(now);
        if self.unreported == 0 || elapsed(since) < DROP_REPORT_INTERVAL {
            return None;
        }
        self.last_report = Some(now);
        let bytes = std::mem::take(&mut self.unreported);
        Some(self.drop_message(bytes, elapsed(since)))
    }

    fn limit_text(&self) -> String {
        format!(
            "{} KiB/s, burst {} KiB",
            self.limits.rate_bytes_s / 1024,
            self.limits.burst_bytes / 1024
        )
    }

    fn drop_message(&self, bytes: u64, over: Duration) -> String {
        format!(
            "serial: dropped {bytes} bytes of guest output over its limit ({}) in the last {:.1} s; \
             {} in all",
            self.limit_text(),
            over.as_secs_f64(),
            self.stats.dropped_bytes()
        )
    }
}

impl Write for RateLimited {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_at(buf, Instant::now())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Drop for RateLimited {
    /// What was dropped since the last warning is not lost to the log.
    fn drop(&mut self) {
        if self.unreported > 0 {
            let since = self.last_report.map_or(Duration::ZERO, |t| t.elapsed());
            log::warn!("{}", self.drop_message(self.unreported, since));
        }
    }
}

/// Writes each guest line as one `guest: LINE\n`. A line ends at `\n` or
/// at NUL (journald ends a line at either), or after [`MAX_LINE`] bytes; a
/// `\r` before its end is dropped. A line the guest has not ended yet is
/// held back (and written when the sink is dropped).
pub struct MarkedLines<W: Write> {
    inner: W,
    line: Vec<u8>,
}

impl<W: Write> MarkedLines<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            line: Vec::with_capacity(GUEST_LINE_PREFIX.len() + MAX_LINE + 1),
        }
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.line.is_empty() {
            self.line.extend_from_slice(GUEST_LINE_PREFIX);
        }
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        self.line.push(b'\n');
        let res = self.inner.write_all(&self.line);
        self.line.clear();
        res
    }
}

impl<W: Write> Write for MarkedLines<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if self.line.is_empty() {
                self.line.extend_from_slice(GUEST_LINE_PREFIX);
            }
            match b {
                b'\n' | 0 => self.emit()?,
                _ => {
                    self.line.push(b);
                    if self.line.len() - GUEST_LINE_PREFIX.len() >= MAX_LINE {
                        self.emit()?;
                    }
                }
            }
        }
        Ok(buf.len())
    }

    /// Flushes the sink only: a line the guest has not ended stays held
    /// back (the UART flushes after every byte).
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Drop for MarkedLines<W> {
    fn drop(&mut self) {
        if self.line.len() > GUEST_LINE_PREFIX.len() {
            let _ = self.emit();
        }
    }
}

/// A `file:` sink of at most `max` bytes: when the next byte would not
/// fit, PATH becomes PATH.1 (replacing the previous one) and a new PATH is
/// started. `max` 0: no cap.
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
    stats: Arc<SerialStats>,
    /// Rotation failed once already (said once, then the file is truncated).
    rotate_failed: bool,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// PATH.1 for PATH.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

impl RotatingFile {
    pub fn open(path: &Path, max: u64, stats: Arc<SerialStats>) -> io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            max,
            stats,
            rotate_failed: false,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        let old = rotated_path(&self.path);
        match std::fs::rename(&self.path, &old).and_then(|()| open_append(&self.path)) {
            Ok(file) => {
                log::info!(
                    "serial: {} reached {} bytes; the older output is now in {}",
                    self.path.display(),
                    self.max,
                    old.display()
                );
                self.file = file;
            }
            Err(e) => {
                // Never beyond the cap: start the file again instead.
                if !self.rotate_failed {
                    log::warn!(
                        "serial: cannot rotate {} to {}: {e}; truncating it instead",
                        self.path.display(),
                        old.display()
                    );
                    self.rotate_failed = true;
                }
                self.file.set_len(0)?;
            }
        }
        self.size = 0;
        self.stats.rotations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.max == 0 {
            return self.file.write(buf);
        }
        if self.size >= self.max {
            self.rotate()?;
        }
        let room = usize::try_from(self.max - self.size).unwrap_or(usize::MAX);
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Whether guest lines on stdout are marked: unless stdout is a terminal
/// (someone at the console, who wants it raw: prompts, escape sequences).
pub fn marks_stdout(stdout: impl AsFd) -> bool {
    !stdout.as_fd().is_terminal()
}

/// Opens the sink `sink` with its bounds; the stats are the port's.
pub fn open(sink: &SerialSink, limits: SerialLimits) -> io::Result<(SerialOut, Arc<SerialStats>)> {
    let stats = Arc::new(SerialStats::default());
    let out: SerialOut = match sink {
        SerialSink::None => return Ok((Box::new(io::sink()), stats)),
        SerialSink::Stdout => {
            // Unbuffered: each guest line (or byte, on a terminal) reaches
            // the host as soon as the guest ends it.
            let stdout = File::from(io::stdout().as_fd().try_clone_to_owned()?);
            if marks_stdout(&stdout) {
                Box::new(MarkedLines::new(stdout))
            } else {
                Box::new(stdout)
            }
        }
        SerialSink::File(path) => Box::new(RotatingFile::open(
            path,
            limits.file_max_bytes,
            stats.clone(),
        )?),
    };
    Ok((
        Box::new(RateLimited::new(out, limits, stats.clone())),
        stats,
    ))
}
