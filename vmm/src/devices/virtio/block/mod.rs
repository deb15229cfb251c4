//! virtio-blk on a raw image file.
//!
//! One request queue, served synchronously on the device event loop. The
//! image is locked (see [`lock`]) for as long as the device exists.

mod image;
mod lock;
mod request;

use std::mem::offset_of;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

pub use image::{DiskImage, ImageError, SECTOR_SIZE};
pub use request::{BlockCounters, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};

use super::device::{read_config_bytes, ActivateError, VirtioDevice};
use super::queue::{drain, QueueCtx};
use super::COMMON_FEATURES;
use crate::config::devices::DiskConfig;

pub const QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_blk_config` we fill in: up to and including
/// write_zeroes_may_unmap and its padding (secure erase and zoned devices
/// are not offered).
const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

pub struct Block {
    disk: DiskImage,
    features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    counters: Arc<BlockCounters>,
    bounce: Vec<u8>,
}

// By hand: the bounce buffer is 128 KiB of bytes.
impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk)
            .field("features", &self.features)
            .field("acked_features", &self.acked_features)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// Opens and locks the image.
    pub fn new(cfg: &DiskConfig) -> Result<Self, ImageError> {
        let disk = DiskImage::open(cfg)?;
        let mut features = COMMON_FEATURES
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        if cfg.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let config = build_config(disk.capacity_sectors());
        Ok(Self {
            disk,
            features,
            acked_features: 0,
            config,
            counters: Arc::default(),
            bounce: Vec::new(),
        })
    }

    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    /// Makes everything the guest wrote durable (fdatasync) through the
    /// device's own descriptor, while it still holds the image's lock; a
    /// read-only disk has nothing to flush (false). The VM's last act on
    /// its disks.
    pub fn flush_to_host(&self) -> std::io::Result<bool> {
        if self.disk.read_only() {
            return Ok(false);
        }
        self.disk.flush().map(|()| true)
    }

    pub fn path(&self) -> &std::path::Path {
        self.disk.path()
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
        self.acked_features = 0;
    }

    fn queue_notify(&mut self, index: usize, ctx: &mut QueueCtx<'_>) {
        if index != 0 {
            return;
        }
        let mut rctx = request::Context {
            disk: &self.disk,
            acked_features: self.acked_features,
            counters: &self.counters,
            bounce: &mut self.bounce,
        };
        drain(ctx, 0, |mem, chain| request::handle(&mut rctx, mem, chain));
    }
}

#[cfg(test)]
mod tests;
