//! Token-bucket rate limiters for what a guest asks of its devices: bytes
//! and operations per second on a disk, each direction of a NIC, the
//! entropy device, and the queue notifications of every device.
//!
//! A bucket holds up to one second of its rate and may go into debt: an
//! operation is admitted while the bucket is positive and then charged in
//! full, so a request never has to be split or put back into the ring, and
//! one large request simply makes the next ones wait longer. While a
//! device is throttled it leaves the guest's chains in the ring and arms a
//! timerfd for the moment its buckets are positive again; the event loop
//! wakes it there. The time spent throttled is counted for `/stats`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

pub use crate::token_bucket::TokenBucket;

/// The shortest throttled period. Waking for every single token (50 us at
/// 20,000/s) would cost more than serving the operation did; sleeping at
/// least this long bounds a throttled device to 200 wakeups a second, and
/// it comes back with a batch of tokens.
pub const MIN_THROTTLE: Duration = Duration::from_millis(5);

/// The limits of one rate limiter; None is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub bytes_per_s: Option<u64>,
    pub ops_per_s: Option<u64>,
}

impl Limits {
    pub const UNLIMITED: Limits = Limits {
        bytes_per_s: None,
        ops_per_s: None,
    };

    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_s.is_none() && self.ops_per_s.is_none()
    }
}

/// A device's limiter: a bytes bucket and an operations bucket, a timer
/// that ends a throttled period, and the time spent throttled.
#[derive(Debug)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Option<TimerFd>,
    throttled_since: Option<Instant>,
    throttled_ns: Arc<AtomicU64>,
}

impl RateLimiter {
    /// A limiter for `limits`; an unlimited one needs no timer.
    pub fn new(limits: Limits) -> io::Result<Self> {
        let now = Instant::now();
        let timer = if limits.is_unlimited() {
            None
        } else {
            let t = TimerFd::new()?;
            set_nonblocking(t.as_raw_fd())?;
            Some(t)
        };
        Ok(Self {
            bytes: limits.bytes_per_s.map(|r| TokenBucket::new(r, now)),
            ops: limits.ops_per_s.map(|r| TokenBucket::new(r, now)),
            timer,
            throttled_since: None,
            throttled_ns: Arc::default(),
        })
    }

    pub fn unlimited() -> Self {
        Self {
            bytes: None,
            ops: None,
            timer: None,
            throttled_since: None,
            throttled_ns: Arc::default(),
        }
    }

    /// The nanoseconds spent throttled so far (shared with `/stats`).
    pub fn throttled_ns(&self) -> Arc<AtomicU64> {
        self.throttled_ns.clone()
    }

    /// The timerfd the event loop must watch (None when unlimited).
    pub fn timer_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(AsRawFd::as_raw_fd)
    }

    pub fn is_throttled(&self) -> bool {
        self.throttled_since.is_some()
    }

    /// True when the device may start another operation. Otherwise the
    /// device is throttled until the timer fires ([`Self::on_timer`]).
    pub fn admit(&mut self) -> bool {
        self.admit_at(Instant::now())
    }

    fn admit_at(&mut self, now: Instant) -> bool {
        if self.throttled_since.is_some() {
            return false;
        }
        let mut wait = Duration::ZERO;
        for b in [self.bytes.as_mut(), self.ops.as_mut()]
            .into_iter()
            .flatten()
        {
            if !b.ready(now) {
                wait = wait.max(b.wait());
            }
        }
        if wait.is_zero() {
            return true;
        }
        let wait = wait.max(MIN_THROTTLE);
        self.throttled_since = Some(now);
        if let Some(t) = self.timer.as_mut() {
            if let Err(e) = t.reset(wait, None) {
                // Without a timer nothing would wake the device: give up
                // throttling rather than stall it.
                warn_ratelimited!("rate limiter: cannot arm its timer: {e}");
                self.throttled_since = None;
                return true;
            }
        }
        false
    }

    /// Charges one operation of `bytes` bytes.
    pub fn charge(&mut self, bytes: u64) {
        self.charge_many(1, bytes);
    }

    /// Charges `ops` operations moving `bytes` bytes in all. The operations
    /// charged at once are capped at one second's worth, so that a count
    /// that piled up (notifications made while the device was throttled)
    /// delays the device at most that long; bytes are charged in full.
    pub fn charge_many(&mut self, ops: u64, bytes: u64) {
        if let Some(b) = self.bytes.as_mut() {
            b.take(bytes);
        }
        if let Some(o) = self.ops.as_mut() {
            o.take(ops.min(o.rate()));
        }
    }

    /// The timer fired (or may have): ends the throttled period. The device
    /// then serves its queue again, which throttles anew if needed.
    pub fn on_timer(&mut self) {
        self.on_timer_at(Instant::now());
    }

    fn on_timer_at(&mut self, now: Instant) {
        if let Some(t) = self.timer.as_mut() {
            // Non-blocking: EAGAIN when it has not expired, which is fine.
            let _ = t.wait();
        }
        if let Some(since) = self.throttled_since.take() {
            let ns =
                u64::try_from(now.saturating_duration_since(since).as_nanos()).unwrap_or(u64::MAX);
            self.throttled_ns.fetch_add(ns, Ordering::Relaxed);
        }
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::unlimited()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a file descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Nanoseconds to whole milliseconds, for the counters `/stats` shows.
pub fn ms(ns: &AtomicU64) -> u64 {
    ns.load(Ordering::Relaxed) / 1_000_000
}

#[cfg(test)]
mod tests;
