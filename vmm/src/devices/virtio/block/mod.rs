//! virtio-blk on a raw image file.
//!
//! One request queue. The device loop parses each chain ([`request`]) and
//! hands it to the disk's own I/O thread ([`io`]), which runs it against
//! the image; completions come back through an EventFd. What one guest can
//! make the host do is bounded three ways: a request carries at most
//! [`MAX_REQUEST_BYTES`] of data, at most [`MAX_IN_FLIGHT`] requests
//! ([`MAX_IN_FLIGHT_BYTES`]) are with the I/O thread at once, and a rate
//! limiter (`bw=`, `iops=`) decides when the next one may start. The image
//! is locked (see [`lock`]) for as long as the device exists.

mod image;
mod io;
mod lock;
mod request;
mod sg;

use std::collections::VecDeque;
use std::mem::offset_of;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::GuestMemoryMmap;

pub use image::{DiskImage, ImageError, SECTOR_SIZE};
pub use request::{
    BlockCounters, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_REQUEST_BYTES, MAX_SEGMENT_BYTES,
};

use super::device::{read_config_bytes, ActivateError, EventSource, VirtioDevice};
use super::limiter::{ms, Limits, RateLimiter};
use super::queue::{QueueBroken, QueueCtx};
use super::COMMON_FEATURES;
use crate::config::devices::DiskConfig;
use io::IoThread;
use request::{finish, parse, Status};

pub const QUEUE_SIZE: u16 = 256;
/// Requests with the I/O thread at once; the rest wait in the ring.
pub const MAX_IN_FLIGHT: usize = 64;
/// Data bytes with the I/O thread at once.
pub const MAX_IN_FLIGHT_BYTES: u64 = 64 << 20;
/// How long a reset waits for the requests in flight to finish.
const RESET_WAIT: Duration = Duration::from_secs(30);
/// Bytes of `struct virtio_blk_config` we fill in: up to and including
/// write_zeroes_may_unmap and its padding (secure erase and zoned devices
/// are not offered).
const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);
/// Event sources: the I/O thread's completions, the rate limiter's timer.
const SRC_DONE: usize = 0;
const SRC_LIMITER: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot start the I/O thread of disk image {path}: {source}")]
    Thread {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct Block {
    disk: Arc<DiskImage>,
    features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    counters: Arc<BlockCounters>,
    io: IoThread,
    limiter: RateLimiter,
    /// Data bytes of each request with the I/O thread, oldest first (they
    /// complete in order).
    in_flight: VecDeque<u64>,
    in_flight_bytes: u64,
}

impl Block {
    /// Opens and locks the image and starts its I/O thread.
    pub fn new(cfg: &DiskConfig, mem: &GuestMemoryMmap) -> Result<Self, BlockError> {
        let disk = Arc::new(DiskImage::open(cfg)?);
        let thread_err = |source| BlockError::Thread {
            path: cfg.path.clone(),
            source,
        };
        let mut features = COMMON_FEATURES
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        if cfg.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let config = build_config(disk.capacity_sectors());
        let counters = Arc::<BlockCounters>::default();
        let io =
            IoThread::spawn(disk.clone(), mem.clone(), counters.clone()).map_err(thread_err)?;
        let limiter = RateLimiter::new(Limits {
            bytes_per_s: cfg.bytes_per_s(),
            ops_per_s: cfg.ops_per_s(),
        })
        .map_err(thread_err)?;
        Ok(Self {
            disk,
            features,
            acked_features: 0,
            config,
            counters,
            io,
            limiter,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
        })
    }

    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    /// Ends the I/O thread (failing what is still queued, see [`io`]) and
    /// makes everything the guest wrote durable (fdatasync) through the
    /// device's own descriptor, while it still holds the image's lock; a
    /// read-only disk has nothing to flush (false). The VM's last act on
    /// its disks.
    pub fn flush_to_host(&mut self) -> std::io::Result<bool> {
        self.io.shutdown();
        if self.disk.read_only() {
            return Ok(false);
        }
        self.disk.flush().map(|()| true)
    }

    pub fn path(&self) -> &std::path::Path {
        self.disk.path()
    }

    /// Returns finished requests to the driver.
    fn complete(&mut self, ctx: &mut QueueCtx<'_>) {
        let done = self.io.take_completed();
        for &(head, len) in &done {
            ctx.add_used(0, head, len);
            self.retire();
        }
        if !done.is_empty() {
            ctx.notify(0);
        }
    }

    fn retire(&mut self) {
        let bytes = self.in_flight.pop_front().unwrap_or(0);
        self.in_flight_bytes -= bytes.min(self.in_flight_bytes);
    }

    /// True while the I/O thread has all it may have.
    fn saturated(&self) -> bool {
        self.in_flight.len() >= MAX_IN_FLIGHT || self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES
    }

    /// Completes what finished and hands the I/O thread new requests until
    /// the ring is empty, the I/O thread has enough, or the rate limiter
    /// says wait (its timer brings us back).
    fn serve(&mut self, ctx: &mut QueueCtx<'_>) {
        self.complete(ctx);
        let result: Result<(), QueueBroken> = (|| loop {
            ctx.disable_notification(0)?;
            loop {
                if self.saturated() || !self.limiter.admit() {
                    return Ok(());
                }
                let Some(chain) = ctx.pop(0)? else { break };
                let rctx = request::Context {
                    disk: &self.disk,
                    acked_features: self.acked_features,
                    counters: &self.counters,
                };
                let req = parse(&rctx, ctx.mem(), chain);
                let bytes = req.data_bytes();
                self.limiter.charge(bytes);
                let head = req.head;
                if let Err(req) = self.io.submit(req) {
                    // The I/O thread is gone (the VM is stopping).
                    let len = finish(ctx.mem(), &self.counters, &req, Status::IoErr);
                    ctx.add_used(0, head, len);
                    ctx.notify(0);
                    continue;
                }
                self.in_flight.push_back(bytes);
                self.in_flight_bytes += bytes;
            }
            if !ctx.enable_notification(0)? {
                return Ok(());
            }
        })();
        // A corrupt ring is already recorded in ctx; the transport acts on it.
        let _ = result;
    }

    /// Forgets every request in flight once the I/O thread has finished
    /// them (their buffers must not be written after a reset).
    fn forget_in_flight(&mut self) {
        if !self.io.wait_idle(RESET_WAIT) {
            log::error!(
                "virtio-blk: {}: requests still running {} s after a reset",
                self.disk.path().display(),
                RESET_WAIT.as_secs()
            );
        }
        self.io.take_completed();
        self.in_flight.clear();
        self.in_flight_bytes = 0;
    }
}

fn put<const N: usize>(cfg: &mut [u8], at: usize, bytes: [u8; N]) {
    cfg[at..at + N].copy_from_slice(&bytes);
}

fn build_config(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    put(
        &mut c,
        offset_of!(virtio_blk_config, capacity),
        capacity.to_le_bytes(),
    );
    // Data segments per request: the chain also holds header and status.
    let seg_max = u32::from(QUEUE_SIZE) - 2;
    put(
        &mut c,
        offset_of!(virtio_blk_config, seg_max),
        seg_max.to_le_bytes(),
    );
    put(
        &mut c,
        offset_of!(virtio_blk_config, size_max),
        MAX_SEGMENT_BYTES.to_le_bytes(),
    );
    put(
        &mut c,
        offset_of!(virtio_blk_config, blk_size),
        512u32.to_le_bytes(),
    );
    put(
        &mut c,
        offset_of!(virtio_blk_config, num_queues),
        1u16.to_le_bytes(),
    );
    for (field, value) in [
        (
            offset_of!(virtio_blk_config, max_discard_sectors),
            MAX_DISCARD_SECTORS,
        ),
        (
            offset_of!(virtio_blk_config, max_discard_seg),
            MAX_DISCARD_SEGMENTS,
        ),
        // Holes are made in file system blocks: advertise 4 KiB granularity.
        (offset_of!(virtio_blk_config, discard_sector_alignment), 8),
        (
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            MAX_DISCARD_SECTORS,
        ),
        (
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            MAX_DISCARD_SEGMENTS,
        ),
    ] {
        put(&mut c, field, value.to_le_bytes());
    }
    c[offset_of!(virtio_blk_config, write_zeroes_may_unmap)] = 1;
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), ActivateError> {
        self.acked_features = acked_features;
        Ok(())
    }

    fn reset(&mut self) {
        self.forget_in_flight();
        self.acked_features = 0;
    }

    fn queue_notify(&mut self, index: usize, ctx: &mut QueueCtx<'_>) {
        if index == 0 {
            self.serve(ctx);
        }
    }

    fn event_sources(&self) -> Vec<EventSource> {
        use std::os::fd::AsRawFd;
        let mut v = vec![EventSource {
            fd: self.io.done_fd().as_raw_fd(),
            edge_triggered: false,
        }];
        if let Some(fd) = self.limiter.timer_fd() {
            v.push(EventSource {
                fd,
                edge_triggered: false,
            });
        }
        v
    }

    fn handle_event(&mut self, source: usize, ctx: Option<&mut QueueCtx<'_>>) {
        match source {
            SRC_DONE => {}
            SRC_LIMITER => self.limiter.on_timer(),
            _ => return,
        }
        match ctx {
            Some(ctx) => self.serve(ctx),
            // Inactive: a reset already forgot what was in flight.
            None => {
                self.io.take_completed();
            }
        }
    }

    fn drain_io(&mut self, mut ctx: Option<&mut QueueCtx<'_>>) {
        loop {
            match ctx.as_deref_mut() {
                Some(c) => self.serve(c),
                None => self.forget_in_flight(),
            }
            if self.in_flight.is_empty() {
                return;
            }
            if !self.io.wait_idle(RESET_WAIT) {
                return;
            }
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.counters;
        vec![
            ("requests", c.requests.load(Relaxed)),
            ("read_bytes", c.read_bytes.load(Relaxed)),
            ("write_bytes", c.write_bytes.load(Relaxed)),
            ("io_errors", c.io_errors.load(Relaxed)),
            ("unsupported", c.unsupported.load(Relaxed)),
            ("bad_chains", c.bad_chains.load(Relaxed)),
            ("too_large", c.too_large.load(Relaxed)),
            ("failed_at_stop", c.failed_at_stop.load(Relaxed)),
            ("in_flight", self.in_flight.len() as u64),
            ("throttled_ms", ms(&self.limiter.throttled_ns())),
        ]
    }
}

#[cfg(test)]
mod tests;
