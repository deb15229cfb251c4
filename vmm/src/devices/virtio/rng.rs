//! virtio-rng: entropy for the guest, from the host's getrandom(2).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::device::{ActivateError, EventSource, VirtioDevice};
use super::limiter::{ms, Limits, RateLimiter};
use super::queue::{drain_limited, Chain, QueueCtx};
use super::COMMON_FEATURES;
use crate::config::devices::RNG_BYTES_PER_S;

const QUEUE_SIZE: u16 = 64;
/// The most one request gets. Linux asks for a few dozen bytes at a time;
/// the cap bounds the work a single (possibly 4 GiB) chain can demand.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct RngCounters {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    /// Chains with no writable buffer in guest memory.
    pub bad_chains: AtomicU64,
}

#[derive(Debug)]
pub struct Rng {
    counters: Arc<RngCounters>,
    /// Entropy per second ([`RNG_BYTES_PER_S`]).
    limiter: RateLimiter,
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Self::with_limits(Limits {
            bytes_per_s: Some(RNG_BYTES_PER_S),
            ops_per_s: None,
        })
    }

    pub fn with_limits(limits: Limits) -> std::io::Result<Self> {
        Ok(Self {
            counters: Arc::default(),
            limiter: RateLimiter::new(limits)?,
        })
    }

    pub fn counters(&self) -> Arc<RngCounters> {
        self.counters.clone()
    }

    fn serve(&self, mem: &vm_memory::GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut w = match chain.writer(mem) {
            Ok(w) if w.available_bytes() > 0 => w,
            _ => {
                self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
        };
        let mut buf = [0u8; 4096];
        let mut left = w.available_bytes().min(MAX_BYTES_PER_REQUEST);
        while left > 0 {
            let n = left.min(buf.len());
            if let Err(e) = getrandom(&mut buf[..n]) {
                warn_ratelimited!("virtio-rng: getrandom failed: {e}");
                break;
            }
            if w.write_all(&buf[..n]).is_err() {
                break;
            }
            left -= n;
        }
        let written = w.bytes_written();
        self.counters
            .bytes
            .fetch_add(written as u64, Ordering::Relaxed);
        // At most MAX_BYTES_PER_REQUEST, which fits.
        u32::try_from(written).unwrap_or(u32::MAX)
    }
}

/// Fills `buf` from the kernel's CSPRNG (it does not block once the pool is
/// initialised, which it is long before a VMM runs).
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`,
        // which is a live, exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        // Negative: an error.
        let Ok(n) = usize::try_from(n) else {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        };
        done += n;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), ActivateError> {
        Ok(())
    }

    fn reset(&mut self) {}

    fn queue_notify(&mut self, index: usize, ctx: &mut QueueCtx<'_>) {
        if index == 0 {
            let mut limiter = std::mem::take(&mut self.limiter);
            drain_limited(ctx, 0, &mut limiter, |mem, chain| {
                let n = self.serve(mem, chain);
                (n, u64::from(n))
            });
            self.limiter = limiter;
        }
    }

    fn event_sources(&self) -> Vec<EventSource> {
        self.limiter
            .timer_fd()
            .map(|fd| EventSource {
                fd,
                edge_triggered: false,
            })
            .into_iter()
            .collect()
    }

    fn handle_event(&mut self, _source: usize, ctx: Option<&mut QueueCtx<'_>>) {
        self.limiter.on_timer();
        if let Some(ctx) = ctx {
            self.queue_notify(0, ctx);
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("requests", c.requests.load(Ordering::Relaxed)),
            ("bytes", c.bytes.load(Ordering::Relaxed)),
            ("bad_chains", c.bad_chains.load(Ordering::Relaxed)),
            ("throttled_ms", ms(&self.limiter.throttled_ns())),
        ]
    }
}

#[cfg(test)]
mod tests;
