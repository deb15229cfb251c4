//! The interface between the virtio-mmio transport and a device model.

use std::os::fd::RawFd;

use super::queue::QueueCtx;

/// A file descriptor a device wants the event loop to watch for input
/// (a TAP device, a timer), besides its queue notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSource {
    pub fd: RawFd,
    /// Edge-triggered: the device reads until EAGAIN, or remembers that it
    /// stopped early and resumes on its own (a TAP device that has frames
    /// but no guest buffers to put them in must not wake the loop in a spin).
    pub edge_triggered: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("cannot configure the device backend: {0}")]
    Backend(#[source] std::io::Error),
}

/// A virtio device model. All methods run with the transport's lock held,
/// either on a vCPU thread (configuration space, reset, activation) or on
/// the device event loop (queues and event sources). `Any`, so that the
/// running VM can reach a device by id as its own type
/// ([`super::Devices::with_device`]).
pub trait VirtioDevice: Send + std::any::Any {
    /// VIRTIO_ID_* of this device.
    fn device_type(&self) -> u32;

    /// The maximum size of each queue the device can have; the driver may
    /// use fewer (a balloon's optional queues exist only with their feature).
    fn queue_max_sizes(&self) -> &[u16];

    /// Every feature bit the device offers, including the common ones.
    fn features(&self) -> u64;

    /// Reads the device configuration space; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space. Most devices have nothing
    /// writable there.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn_ratelimited!(
            "virtio: ignoring {}-byte write to read-only config space at {offset:#x}",
            data.len()
        );
    }

    /// The driver set DRIVER_OK with `acked_features`; the queues it enabled
    /// are valid in guest memory.
    fn activate(&mut self, acked_features: u64) -> Result<(), ActivateError>;

    /// The driver reset the device: drop every piece of per-session state.
    fn reset(&mut self);

    /// The driver (or the device itself, see `QueueCtx::requeue`) notified
    /// queue `index`.
    fn queue_notify(&mut self, index: usize, ctx: &mut QueueCtx<'_>);

    /// Extra file descriptors to watch; fixed for the device's lifetime.
    fn event_sources(&self) -> Vec<EventSource> {
        Vec::new()
    }

    /// `event_sources()[source]` is readable. `ctx` is None while the
    /// device is not active, in which case the device must still consume
    /// the event (a level-triggered fd would otherwise wake the loop again).
    fn handle_event(&mut self, source: usize, ctx: Option<&mut QueueCtx<'_>>) {
        let _ = (source, ctx);
    }

    /// Waits until the requests the device runs asynchronously (a disk's
    /// I/O thread) have finished and returns them to the driver (`ctx`
    /// None: forgets them). Before a snapshot, and for tests that check
    /// the ring right after a notification.
    fn drain_io(&mut self, ctx: Option<&mut QueueCtx<'_>>) {
        let _ = ctx;
    }

    /// The device's counters by name, for `/stats` and `/metrics`.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Copies `data.len()` bytes of `config` starting at `offset` into `data`,
/// zero-filling what lies past the end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
