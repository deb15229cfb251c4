//! The virtio-mmio transport, version 2 (virtio 1.x "modern") register layout.
//!
//! vCPU threads reach it through the MMIO bus on every register access; the
//! device event loop reaches it through [`MmioTransport::process_queue`] and
//! [`MmioTransport::handle_event`]. Both hold the same mutex, so a reset from
//! the guest can never race with a request in flight: once the reset write
//! returns, the device has stopped and forgotten its queues.
//!
//! Everything here is driven by the guest. Accesses of the wrong width,
//! writes in the wrong state and out-of-range values are ignored with a
//! rate-limited warning; nothing panics.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{EventSource, VirtioDevice};
use super::interrupt::Interrupt;
use super::queue::QueueCtx;
use crate::devices::bus::BusDevice;

/// "virt", little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// "KSMV": who made the device, for the guest's curiosity only.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"KSMV");

// Register offsets (virtio 1.2, 4.2.2). virtio-bindings has them too, but as
// u32; the bus hands us u64 offsets.
pub const REG_MAGIC_VALUE: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_SHM_SEL: u64 = 0x0ac;
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
pub const REG_SHM_BASE_LOW: u64 = 0x0b8;
pub const REG_SHM_BASE_HIGH: u64 = 0x0bc;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const S_KNOWN: u32 = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_FAILED;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("device offers {queues} queues but {evts} notification EventFds were given")]
    QueueCount { queues: usize, evts: usize },
    #[error("device queue {index} has an invalid maximum size {size}")]
    QueueSize { index: usize, size: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before DRIVER_OK, or after a reset.
    Inactive,
    /// Serving queues.
    Active,
    /// Stopped until the driver resets the device.
    NeedsReset,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Interrupt,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver acked bits past the 64 any device offers.
    acked_beyond_64: bool,
    queue_sel: u32,
    state: State,
}

// By hand: the device is a trait object.
impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("queues", &self.queues)
            .field("interrupt", &self.interrupt)
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// `queue_evts[i]` is the notification EventFd of queue i (the one KVM
    /// signals through an ioeventfd); `interrupt` wraps the device's irqfd.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Interrupt,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, TransportError> {
        let sizes = device.queue_max_sizes();
        if sizes.len() != queue_evts.len() {
            return Err(TransportError::QueueCount {
                queues: sizes.len(),
                evts: queue_evts.len(),
            });
        }
        let queues = sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| TransportError::QueueSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            acked_beyond_64: false,
            queue_sel: 0,
            state: State::Inactive,
        })
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The device model, for the VM's by-id access (`Devices::with_device`).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn event_sources(&self) -> Vec<EventSource> {
        self.device.event_sources()
    }

    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_active(&self) -> bool {
        self.state == State::Active
    }

    /// Runs the device on queue `index` (its notification fired).
    pub fn process_queue(&mut self, index: usize) {
        if self.state == State::Active && index < self.queues.len() {
            self.run_device(|d, ctx| d.queue_notify(index, ctx));
        }
    }

    /// Runs the device on its event source `source` (it became readable).
    pub fn handle_event(&mut self, source: usize) {
        if self.state == State::Active {
            self.run_device(|d, ctx| d.handle_event(source, Some(ctx)));
        } else {
            self.device.handle_event(source, None);
        }
    }

    /// Waits for the device's asynchronous requests and returns them to
    /// the driver ([`VirtioDevice::drain_io`]).
    pub fn drain_io(&mut self) {
        if self.state == State::Active {
            self.run_device(|d, ctx| d.drain_io(Some(ctx)));
        } else {
            self.device.drain_io(None);
        }
    }

    fn run_device(&mut self, f: impl FnOnce(&mut dyn VirtioDevice, &mut QueueCtx<'_>)) {
        let mut ctx = QueueCtx::new(
            &self.mem,
            &mut self.queues,
            &self.interrupt,
            &self.queue_evts,
        );
        f(self.device.as_mut(), &mut ctx);
        if ctx.is_broken() {
            self.needs_reset("the driver corrupted a queue");
        }
    }

    fn features(&self) -> u64 {
        self.device.features()
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue if the driver may configure it now: after
    /// FEATURES_OK, before DRIVER_OK, and while the queue is not enabled.
    fn configurable_queue(&mut self, reg: &str) -> Option<&mut Queue> {
        let in_setup = self.status & S_FEATURES_OK != 0 && self.status & S_DRIVER_OK == 0;
        let sel = self.queue_sel;
        match self.queues.get_mut(sel as usize) {
            None => {
                warn_ratelimited!("virtio-mmio: {reg} write for nonexistent queue {sel}");
                None
            }
            Some(_) if !in_setup => {
                warn_ratelimited!(
                    "virtio-mmio: {reg} write for queue {sel} outside queue setup (status {:#x})",
                    self.status
                );
                None
            }
            Some(q) if q.ready() => {
                warn_ratelimited!("virtio-mmio: {reg} write for queue {sel} while it is enabled");
                None
            }
            Some(q) => Some(q),
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        if let Some((r, high)) = RingReg::find(offset) {
            return self.selected_queue().map_or(0, |q| half((r.get)(q), high));
        }
        match offset {
            REG_MAGIC_VALUE => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => (self.features() & 0xffff_ffff) as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: their length reads as all ones.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                warn_ratelimited!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        if let Some((r, high)) = RingReg::find(offset) {
            if let Some(q) = self.configurable_queue(r.name) {
                let addr = GuestAddress(splice((r.get)(q), v, high));
                if (r.set)(q, addr).is_err() {
                    warn_ratelimited!("virtio-mmio: {} {addr:?} not {}-aligned", r.what, r.align);
                }
            }
            return;
        }
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.configurable_queue("QueueNum") {
                    let ok = u16::try_from(v).is_ok_and(|size| q.try_set_size(size).is_ok());
                    if !ok {
                        let max = q.max_size();
                        warn_ratelimited!(
                            "virtio-mmio: ignoring queue size {v}: not a power of two in 1..={max}"
                        );
                    }
                }
            }
            REG_QUEUE_READY => self.write_queue_ready(v),
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            // There are no shared memory regions to select.
            REG_SHM_SEL => {}
            _ => warn_ratelimited!("virtio-mmio: write of {v:#x} to unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & S_DRIVER == 0 || self.status & S_FEATURES_OK != 0 {
            warn_ratelimited!(
                "virtio-mmio: DriverFeatures write outside negotiation (status {:#x})",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => {
                self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32);
            }
            sel if v != 0 => {
                // Bits beyond 64 were never offered; remember the bogus ack
                // so that FEATURES_OK is refused.
                warn_ratelimited!("virtio-mmio: driver acked features {v:#x} in word {sel}");
                self.acked_beyond_64 = true;
            }
            _ => {}
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        match v {
            // Disabling is always allowed: it only stops service.
            0 => {
                if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                    q.set_ready(false);
                }
            }
            1 => {
                // Validity in guest memory is checked at DRIVER_OK, when the
                // driver has finished writing the addresses.
                if let Some(q) = self.configurable_queue("QueueReady") {
                    q.set_ready(true);
                }
            }
            _ => warn_ratelimited!("virtio-mmio: ignoring QueueReady value {v}"),
        }
    }

    /// A notification that did not go through an ioeventfd (none registered,
    /// or the guest wrote a value no ioeventfd matches).
    fn notify(&self, v: u32) {
        match self.queue_evts.get(v as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn_ratelimited!(
                        "virtio-mmio: cannot forward notification for queue {v}: {e}"
                    );
                }
            }
            None => warn_ratelimited!("virtio-mmio: notification for nonexistent queue {v}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & !(S_KNOWN | S_NEEDS_RESET) != 0 {
            warn_ratelimited!("virtio-mmio: ignoring status {v:#x} with unknown bits");
            return;
        }
        // NEEDS_RESET belongs to the device; the driver cannot set or clear it.
        let old = self.status & S_KNOWN;
        let mut new = v & S_KNOWN;
        if new & old != old {
            warn_ratelimited!(
                "virtio-mmio: ignoring status {v:#x}: only a reset may clear bits of {old:#x}"
            );
            return;
        }
        let added = new & !old;
        let order_ok = (added & S_DRIVER == 0 || new & S_ACK != 0)
            && (added & S_FEATURES_OK == 0 || new & S_DRIVER != 0);
        if !order_ok {
            warn_ratelimited!("virtio-mmio: ignoring status {v:#x}: out of order");
            return;
        }
        if added & S_FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads the status back and gives up.
            new &= !S_FEATURES_OK;
        }
        if added & S_DRIVER_OK != 0 && new & S_FEATURES_OK == 0 {
            warn_ratelimited!("virtio-mmio: ignoring DRIVER_OK before FEATURES_OK");
            new &= !S_DRIVER_OK;
        }
        self.status = new | (self.status & S_NEEDS_RESET);
        if new & !old & S_DRIVER_OK != 0 && self.state == State::Inactive {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let unoffered = self.driver_features & !self.features();
        if unoffered != 0 || self.acked_beyond_64 {
            warn_ratelimited!("virtio-mmio: driver acked unoffered features {unoffered:#x}");
            return false;
        }
        if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            warn_ratelimited!("virtio-mmio: driver did not ack VIRTIO_F_VERSION_1 (legacy driver)");
            return false;
        }
        true
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !queue_in_memory(q, &self.mem) {
                self.needs_reset(&format!("queue {i} lies outside guest memory"));
                return;
            }
        }
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        if let Err(e) = self.device.activate(self.driver_features) {
            self.needs_reset(&format!("activation failed: {e}"));
            return;
        }
        self.state = State::Active;
        // Buffers the driver queued before DRIVER_OK (RX buffers, a stats
        // buffer) were notified while nobody served them: look now.
        for (q, evt) in self.queues.iter().zip(&self.queue_evts) {
            if q.ready() {
                if let Err(e) = evt.write(1) {
                    warn_ratelimited!("virtio-mmio: cannot kick queue after activation: {e}");
                }
            }
        }
    }

    fn needs_reset(&mut self, why: &str) {
        warn_ratelimited!(
            "virtio-mmio: device type {} stops until reset: {why}",
            self.device.device_type()
        );
        self.state = State::NeedsReset;
        self.status |= S_NEEDS_RESET;
        if self.status & S_DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    /// Returns the device to its power-on state: the driver starts over.
    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.acked_beyond_64 = false;
        self.queue_sel = 0;
        self.state = State::Inactive;
    }
}

/// One of the three ring addresses a driver programs, each as a pair of
/// 32-bit registers (low, high).
struct RingReg {
    low: u64,
    high: u64,
    name: &'static str,
    what: &'static str,
    align: u32,
    get: fn(&Queue) -> u64,
    set: fn(&mut Queue, GuestAddress) -> Result<(), virtio_queue::Error>,
}

const RING_REGS: [RingReg; 3] = [
    RingReg {
        low: REG_QUEUE_DESC_LOW,
        high: REG_QUEUE_DESC_HIGH,
        name: "QueueDesc",
        what: "descriptor table",
        align: 16,
        get: |q| q.desc_table(),
        set: |q, a| q.try_set_desc_table_address(a),
    },
    RingReg {
        low: REG_QUEUE_DRIVER_LOW,
        high: REG_QUEUE_DRIVER_HIGH,
        name: "QueueDriver",
        what: "available ring",
        align: 2,
        get: |q| q.avail_ring(),
        set: |q, a| q.try_set_avail_ring_address(a),
    },
    RingReg {
        low: REG_QUEUE_DEVICE_LOW,
        high: REG_QUEUE_DEVICE_HIGH,
        name: "QueueDevice",
        what: "used ring",
        align: 4,
        get: |q| q.used_ring(),
        set: |q, a| q.try_set_used_ring_address(a),
    },
];

impl RingReg {
    /// The ring address register at `offset`, and whether it is the high half.
    fn find(offset: u64) -> Option<(&'static RingReg, bool)> {
        RING_REGS
            .iter()
            .find(|r| offset == r.low || offset == r.high)
            .map(|r| (r, offset == r.high))
    }
}

/// The low or high half of `v`.
fn half(v: u64, high: bool) -> u32 {
    if high {
        (v >> 32) as u32
    } else {
        (v & 0xffff_ffff) as u32
    }
}

/// Replaces the low or high half of `old` with `v`.
fn splice(old: u64, v: u32, high: bool) -> u64 {
    if high {
        (old & 0xffff_ffff) | (u64::from(v) << 32)
    } else {
        (old & !0xffff_ffff) | u64::from(v)
    }
}

/// True if the rings of `q` lie entirely in guest RAM. (virtio-queue's
/// `is_valid` checks the same but logs at error level on every failure,
/// which a guest could use to flood the log.)
fn queue_in_memory(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    let n = usize::from(q.size());
    let ranges = [
        (q.desc_table(), 16 * n),
        (q.avail_ring(), 6 + 2 * n),
        (q.used_ring(), 6 + 8 * n),
    ];
    ranges
        .iter()
        .all(|&(addr, len)| mem.check_range(GuestAddress(addr), len))
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - REG_CONFIG, data);
            } else {
                warn_ratelimited!("virtio-mmio: {}-byte config read", data.len());
                data.fill(0);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            warn_ratelimited!(
                "virtio-mmio: {}-byte register read at {offset:#x}; registers are 32-bit",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - REG_CONFIG, data);
            } else {
                warn_ratelimited!("virtio-mmio: {}-byte config write", data.len());
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn_ratelimited!(
                "virtio-mmio: {}-byte register write at {offset:#x}; registers are 32-bit",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            warn_ratelimited!("virtio-mmio: unaligned register write at {offset:#x}");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
