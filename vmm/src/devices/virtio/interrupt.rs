//! The interrupt line of one virtio-mmio device.
//!
//! The line is an irqfd: writing the EventFd makes KVM pulse the device's
//! GSI on the in-kernel IOAPIC without a trip through the vCPU thread. The
//! InterruptStatus register says why it fired; the guest clears the bits
//! with InterruptACK.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// InterruptStatus bit: the device used buffers in a queue.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the device configuration changed.
pub const INT_CONFIG_CHANGE: u32 = 2;

#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            evt,
        }
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING);
    }

    /// Tells the driver that the configuration space changed. The generation
    /// moves first so that a driver that sees the interrupt rereads.
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.signal(INT_CONFIG_CHANGE);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        // The only failure is a saturated counter, which means an interrupt
        // is already pending: nothing is lost by ignoring it.
        if let Err(e) = self.evt.write(1) {
            warn_ratelimited!("virtio: cannot signal interrupt: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Clears pending causes on device reset. The generation keeps counting:
    /// it only has to differ between two reads that straddle a change.
    pub fn reset(&self) {
        self.status.store(0, Ordering::Release);
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn signals_set_bits_and_fire_the_eventfd_until_acked() {
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        assert_eq!(irq.status(), 0);
        irq.signal_used_queue();
        assert_eq!(irq.status(), INT_USED_RING);
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        irq.signal_config_change();
        assert_eq!(irq.status(), INT_USED_RING | INT_CONFIG_CHANGE);
        assert_eq!(irq.config_generation(), 1);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG_CHANGE);
        irq.reset();
        assert_eq!(irq.status(), 0);
        assert_eq!(irq.config_generation(), 1);
    }
}
