//! The token bucket behind every rate limit in the VMM: device I/O and
//! queue notifications (`devices::virtio::limiter`) and guest serial output
//! (`devices::serial`).
//!
//! Tokens refill at `rate` per second up to `capacity`; refills of less
//! than a token are carried over (in token-nanoseconds), so a bucket that
//! is asked often, in tiny steps (a UART byte per VM exit), loses nothing.
//! A bucket may go into debt ([`TokenBucket::take`], for operations that
//! are admitted whole and charged afterwards) or hand out only what it has
//! ([`TokenBucket::take_up_to`], for bytes that may be dropped).

use std::time::{Duration, Instant};

const NANOS_PER_S: u128 = 1_000_000_000;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    /// May be negative: the debt of the last admitted operation.
    tokens: i128,
    /// Refill not yet whole tokens, in token-nanoseconds.
    carry: u128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket holding one second of `rate` (at least 1 per second:
    /// 0 is "unlimited" in the configuration and never makes a bucket).
    pub fn new(rate: u64, now: Instant) -> Self {
        Self::with_capacity(rate, rate, now)
    }

    /// A full bucket of `capacity` tokens refilled at `rate` per second.
    pub fn with_capacity(rate: u64, capacity: u64, now: Instant) -> Self {
        Self {
            rate: rate.max(1),
            capacity,
            tokens: i128::from(capacity),
            carry: 0,
            last: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        let ns = now.saturating_duration_since(self.last).as_nanos();
        // A clock that went backwards (never, with Instant) refills nothing.
        self.last = self.last.max(now);
        let gained = u128::from(self.rate)
            .saturating_mul(ns)
            .saturating_add(self.carry);
        self.carry = gained % NANOS_PER_S;
        let whole = i128::try_from(gained / NANOS_PER_S).unwrap_or(i128::MAX);
        self.tokens = self.tokens.saturating_add(whole);
        if self.tokens >= i128::from(self.capacity) {
            // A full bucket saves nothing more, not even a fraction.
            self.tokens = i128::from(self.capacity);
            self.carry = 0;
        }
    }

    /// True when an operation may start now (the bucket is positive).
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0
    }

    /// Charges `n` tokens; the bucket may go into debt.
    pub fn take(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(i128::from(n));
    }

    /// Takes at most `n` tokens, never into debt; returns how many.
    pub fn take_up_to(&mut self, n: u64, now: Instant) -> u64 {
        self.refill(now);
        let have = u64::try_from(self.tokens.max(0)).unwrap_or(u64::MAX);
        let took = n.min(have);
        self.tokens -= i128::from(took);
        took
    }

    /// How long until the bucket is positive again (zero if it is).
    pub fn wait(&self) -> Duration {
        if self.tokens > 0 {
            return Duration::ZERO;
        }
        // Tokens needed to reach 1, less the fraction already carried.
        let need = u128::try_from(1 - self.tokens).unwrap_or(u128::MAX);
        let ns = need
            .saturating_mul(NANOS_PER_S)
            .saturating_sub(self.carry)
            .div_ceil(u128::from(self.rate));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_burst_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, t0);
        assert!(b.ready(t0));
        b.take(1000);
        assert!(!b.ready(t0), "a full second of tokens is spent");
        assert_eq!(b.wait(), Duration::from_millis(1), "one token takes 1 ms");
        assert!(!b.ready(t0 + Duration::from_micros(999)));
        assert!(b.ready(t0 + Duration::from_millis(1)));
        // The bucket never holds more than its capacity.
        assert!(b.ready(t0 + Duration::from_secs(100)));
        b.take(1000);
        assert!(!b.ready(t0 + Duration::from_secs(100)));
    }

    #[test]
    fn debt_makes_the_next_operation_wait_for_the_whole_charge() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20, t0);
        b.take(16 << 20);
        assert!(!b.ready(t0));
        let w = b.wait();
        assert!(
            w > Duration::from_secs(15) && w <= Duration::from_secs(15) + Duration::from_micros(1),
            "15 MiB of debt at 1 MiB/s: {w:?}"
        );
        assert!(!b.ready(t0 + Duration::from_secs(14)));
        assert!(b.ready(t0 + Duration::from_secs(15) + Duration::from_millis(1)));
    }

    #[test]
    fn fractional_refill_is_not_lost() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, t0);
        b.take(3);
        // 3 tokens/s in steps of 100 ms: 0.3 tokens each; the fourth makes 1.2.
        let mut t = t0;
        for _ in 0..3 {
            t += Duration::from_millis(100);
            assert!(!b.ready(t));
        }
        t += Duration::from_millis(100);
        assert!(b.ready(t), "carried fractions add up");
    }

    #[test]
    fn take_up_to_hands_out_the_burst_then_the_rate_and_never_owes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::with_capacity(1000, 100, t0);
        assert_eq!(b.take_up_to(150, t0), 100, "a full bucket holds the burst");
        assert_eq!(b.take_up_to(1, t0), 0);
        // One token every 100 us for 10 ms: each refill is a tenth of a
        // token, and together they make the 10 that 10 ms at 1000/s allow.
        let got: u64 = (1..=100)
            .map(|k| b.take_up_to(1, t0 + Duration::from_micros(100 * k)))
            .sum();
        assert_eq!(got, 10);
        // Idle time saves up to the capacity, no more.
        assert_eq!(b.take_up_to(1000, t0 + Duration::from_secs(60)), 100);
        // A clock that goes backwards takes nothing.
        assert_eq!(b.take_up_to(1, t0), 0);
    }
}
