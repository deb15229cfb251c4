//! Puts virtio devices into the VM: an MMIO window and an IRQ each, KVM
//! wiring for their interrupts and queue notifications, and the kernel
//! command line that tells a Linux guest where they are.
//!
//! ```ignore
//! let mut virtio = VirtioDevices::new(mem.clone());
//! for disk in &cfg.disks {
//!     virtio.add(Block::new(disk)?, &mut mmio_bus, &vm_fd, &mut cmdline_extra)?;
//! }
//! let (balloon, balloon_handle) = Balloon::new(&cfg.balloon, &mem)?;
//! virtio.add(balloon, &mut mmio_bus, &vm_fd, &mut cmdline_extra)?;
//! let (event_loop, devices) = virtio.start()?; // stop() and join() the loop on VM exit
//! devices.with_device::<Balloon, _>("balloon0", |b| b.handle())?;
//! ```

use std::io;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::VirtioDevice;
use super::event_loop::{self, EventLoopError, EventLoopHandle, LoopDevice};
use super::interrupt::Interrupt;
use super::limiter::{Limits, RateLimiter};
use super::mmio::{MmioTransport, TransportError, REG_QUEUE_NOTIFY};
use super::registry::Devices;
use crate::arch::x86_64::layout::{
    virtio_irq, IRQ_ACPI_SCI, IRQ_MAX, IRQ_VIRTIO_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::config::devices::NOTIFY_PER_S;
use crate::devices::bus::{Bus, BusError};

/// The KVM calls the manager needs; implemented for `VmFd`, faked in tests.
pub trait EventRegistrar {
    /// Makes a write to `evt` raise `gsi` on the in-kernel irqchip.
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> io::Result<()>;
    /// Makes a 4-byte guest write of `datamatch` to `mmio_addr` signal `evt`
    /// in the kernel instead of exiting to userspace.
    fn register_ioevent(&self, evt: &EventFd, mmio_addr: u64, datamatch: u32) -> io::Result<()>;
}

impl EventRegistrar for VmFd {
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> io::Result<()> {
        VmFd::register_irqfd(self, evt, gsi).map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn register_ioevent(&self, evt: &EventFd, mmio_addr: u64, datamatch: u32) -> io::Result<()> {
        VmFd::register_ioevent(self, evt, &IoEventAddress::Mmio(mmio_addr), datamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// Where a device landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Position in the order of `add` calls.
    pub index: usize,
    /// VIRTIO_ID_* of the device.
    pub device_type: u32,
    pub mmio_base: u64,
    pub mmio_size: u64,
    pub irq: u32,
}

impl DeviceInfo {
    /// The kernel parameter that declares this device to Linux
    /// (drivers/virtio/virtio_mmio.c, CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
    pub fn cmdline(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.mmio_size >> 10,
            self.mmio_base,
            self.irq
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("too many virtio devices: IRQs {IRQ_VIRTIO_BASE}-{IRQ_MAX} but the SCI ({IRQ_ACPI_SCI}) allow at most {max}")]
    TooMany { max: usize },
    #[error("cannot create EventFds for virtio device {index}: {source}")]
    EventFd { index: usize, source: io::Error },
    #[error("cannot connect the interrupt of virtio device {index} (GSI {gsi}) to KVM: {source}")]
    Irqfd {
        index: usize,
        gsi: u32,
        source: io::Error,
    },
    #[error(
        "cannot connect queue {queue} notifications of virtio device {index} to KVM: {source}"
    )]
    Ioevent {
        index: usize,
        queue: u32,
        source: io::Error,
    },
    #[error("virtio device {index}: {source}")]
    Transport {
        index: usize,
        source: TransportError,
    },
    #[error("cannot map virtio device {index} on the MMIO bus: {source}")]
    Bus { index: usize, source: BusError },
}

/// The most devices that fit: one IRQ each from IRQ_VIRTIO_BASE to IRQ_MAX,
/// less the ACPI SCI's.
pub const MAX_DEVICES: usize = (IRQ_MAX - IRQ_VIRTIO_BASE) as usize;

/// The VM's virtio devices, before they start running.
pub struct VirtioDevices {
    mem: Arc<GuestMemoryMmap>,
    devices: Vec<(DeviceInfo, LoopDevice)>,
}

impl std::fmt::Debug for VirtioDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(info, _)| info))
            .finish()
    }
}

impl VirtioDevices {
    /// `mem` is guest RAM; it must not change for the life of the devices.
    pub fn new(mem: Arc<GuestMemoryMmap>) -> Self {
        Self {
            mem,
            devices: Vec::new(),
        }
    }

    /// Gives `device` the next MMIO window and IRQ, connects its interrupt
    /// and queue notifications to KVM, maps it on `mmio_bus`, and appends
    /// its `virtio_mmio.device=` parameter to `cmdline_extra`.
    pub fn add<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
        mmio_bus: &mut Bus,
        vm: &dyn EventRegistrar,
        cmdline_extra: &mut Vec<String>,
    ) -> Result<DeviceInfo, ManagerError> {
        self.add_boxed(Box::new(device), mmio_bus, vm, cmdline_extra)
    }

    /// [`add`](Self::add) for a device model already boxed.
    pub fn add_boxed(
        &mut self,
        device: Box<dyn VirtioDevice>,
        mmio_bus: &mut Bus,
        vm: &dyn EventRegistrar,
        cmdline_extra: &mut Vec<String>,
    ) -> Result<DeviceInfo, ManagerError> {
        let index = self.devices.len();
        let too_many = ManagerError::TooMany { max: MAX_DEVICES };
        if index >= MAX_DEVICES {
            return Err(too_many);
        }
        let irq_index = u32::try_from(index).map_err(|_| too_many)?;
        let info = DeviceInfo {
            index,
            device_type: device.device_type(),
            mmio_base: VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
            mmio_size: VIRTIO_MMIO_SIZE,
            irq: virtio_irq(irq_index),
        };
        let evt_err = |source| ManagerError::EventFd { index, source };
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(evt_err)?;
        let queue_evts = (0..device.queue_max_sizes().len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(evt_err)?;
        let loop_evts = queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(evt_err)?;

        vm.register_irqfd(&irq_evt, info.irq)
            .map_err(|source| ManagerError::Irqfd {
                index,
                gsi: info.irq,
                source,
            })?;
        for (queue, evt) in (0u32..).zip(queue_evts.iter()) {
            // Datamatch on the queue index: the one register address serves
            // all queues, and a write of any other value still exits to the
            // transport (which ignores or forwards it).
            vm.register_ioevent(evt, info.mmio_base + REG_QUEUE_NOTIFY, queue)
                .map_err(|source| ManagerError::Ioevent {
                    index,
                    queue,
                    source,
                })?;
        }

        let transport = MmioTransport::new(
            device,
            self.mem.clone(),
            Interrupt::new(irq_evt),
            queue_evts,
        )
        .map_err(|source| ManagerError::Transport { index, source })?;
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus
            .insert(transport.clone(), info.mmio_base, info.mmio_size)
            .map_err(|source| ManagerError::Bus { index, source })?;
        cmdline_extra.push(info.cmdline());
        let notify = RateLimiter::new(Limits {
            bytes_per_s: None,
            ops_per_s: Some(NOTIFY_PER_S),
        })
        .map_err(evt_err)?;
        self.devices.push((
            info,
            LoopDevice {
                transport,
                queue_evts: loop_evts,
                notify,
                deferred: Vec::new(),
            },
        ));
        Ok(info)
    }

    /// The devices added so far, in order.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceInfo> {
        self.devices.iter().map(|(info, _)| info)
    }

    /// Starts the device event loop thread; the devices stay reachable by
    /// id through the returned registry.
    pub fn start(self) -> Result<(EventLoopHandle, Devices), EventLoopError> {
        let mut registry = Devices::default();
        let mut loop_devices = Vec::with_capacity(self.devices.len());
        for (info, d) in self.devices {
            registry.push(info, d.transport.clone(), d.notify.throttled_ns());
            loop_devices.push(d);
        }
        Ok((event_loop::spawn(loop_devices)?, registry))
    }
}

#[cfg(test)]
mod tests;
