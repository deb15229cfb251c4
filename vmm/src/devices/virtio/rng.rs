//! virtio-rng: entropy for the guest, from the host's getrandom(2).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::device::{ActivateError, VirtioDevice};
use super::queue::{drain, Chain, QueueCtx};
use super::COMMON_FEATURES;

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
}

impl Rng {
    pub fn new() -> Self {
        Self {
            counters: Arc::default(),
        }
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

impl Default for Rng {
    fn default() -> Self {
        Self::new()
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
            drain(ctx, 0, |mem, chain| self.serve(mem, chain));
        }
    }
}

#[cfg(test)]
mod tests;
