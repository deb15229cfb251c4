//! virtio-rng (5.4): one request queue of device-writable buffers.

use crate::virtio::{self, Arena, Error, Mmio, Virtq};

/// Seconds one request may take (a rate-limited device is slow).
const TIMEOUT_S: u64 = 10;
/// Largest request.
const REQ_MAX: u64 = 64 * 1024;
/// Zero-length answers in a row after which the probe gives up.
const EMPTY_MAX: u32 = 16;

pub struct Rng {
    pub mmio: Mmio,
    q: Virtq,
}

impl Rng {
    pub fn init(mmio: Mmio, arena: &mut Arena) -> Result<Rng, (Mmio, Error)> {
        let q = match mmio
            .begin_init(0)
            .and_then(|_| mmio.setup_queue(0, 4, arena))
        {
            Ok(q) => q,
            Err(e) => return Err((mmio, e)),
        };
        mmio.driver_ok();
        Ok(Rng { mmio, q })
    }

    /// Reads `bytes` bytes through `buf` (`buf_len` bytes of arena RAM).
    /// Returns the bytes received (fewer only if the device kept answering
    /// with nothing) and how many distinct byte values they held.
    pub fn read(&mut self, bytes: u64, buf: u64, buf_len: u64) -> Result<(u64, u32), Error> {
        let mut seen = [false; 256];
        let mut got = 0;
        let mut empty = 0;
        while got < bytes && empty < EMPTY_MAX {
            let want = (bytes - got).min(REQ_MAX).min(buf_len);
            self.q.push(&[(buf, want as u32, true)]);
            self.q.kick();
            let (q, mut len) = (&mut self.q, 0u32);
            virtio::wait(&self.mmio, TIMEOUT_S, || match q.pop_used() {
                Some((_, l)) => {
                    len = l;
                    true
                }
                None => false,
            })?;
            let len = u64::from(len).min(want);
            if len == 0 {
                empty += 1;
                continue;
            }
            empty = 0;
            // SAFETY: the device has used the buffer (arena RAM reserved
            // for block/rng I/O) and no longer writes it.
            let data = unsafe { core::slice::from_raw_parts(buf as *const u8, len as usize) };
            for &b in data {
                seen[usize::from(b)] = true;
            }
            got += len;
        }
        Ok((got, seen.iter().filter(|&&s| s).count() as u32))
    }
}
