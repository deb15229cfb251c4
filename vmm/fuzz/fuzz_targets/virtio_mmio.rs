//! The virtio-mmio transport: any sequence of register reads and writes
//! (any offset, width and value), queue notifications and device events,
//! against an rng device (the simplest device model, so that the fuzzer's
//! effort goes into the register file and the status state machine).
//!
//! Checks after every step: the identification registers never change;
//! Status holds only the known bits; InterruptStatus only USED_RING and
//! CONFIG_CHANGE; an active device has ACKNOWLEDGE, DRIVER, FEATURES_OK
//! and DRIVER_OK. At the end, a reset clears Status and InterruptStatus
//! and stops the device, and a normal bring-up then serves a request.

#![no_main]

use arbitrary::Arbitrary;
use ksmvm::devices::bus::BusDevice;
use ksmvm::devices::virtio::mmio::*;
use ksmvm::devices::virtio::test_util::{w, GuestQueue, Harness};
use ksmvm::devices::virtio::Rng;
use ksmvm_fuzz::*;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

const REGS: [u64; 28] = [
    REG_MAGIC_VALUE,
    REG_VERSION,
    REG_DEVICE_ID,
    REG_VENDOR_ID,
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_QUEUE_SEL,
    REG_QUEUE_NUM_MAX,
    REG_QUEUE_NUM,
    REG_QUEUE_READY,
    REG_QUEUE_NOTIFY,
    REG_INTERRUPT_STATUS,
    REG_INTERRUPT_ACK,
    REG_STATUS,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_SHM_SEL,
    REG_SHM_LEN_LOW,
    REG_SHM_LEN_HIGH,
    REG_SHM_BASE_LOW,
    REG_SHM_BASE_HIGH,
    REG_CONFIG_GENERATION,
];

#[derive(Arbitrary, Debug)]
enum Reg {
    Known(u8),
    Config(u8),
    Raw(u16),
}

impl Reg {
    fn offset(&self) -> u64 {
        match self {
            Reg::Known(i) => REGS[usize::from(*i) % REGS.len()],
            Reg::Config(o) => REG_CONFIG + u64::from(*o),
            Reg::Raw(o) => u64::from(*o) % 0x1000,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        reg: Reg,
        value: u64,
        width: u8,
    },
    Read {
        reg: Reg,
        width: u8,
    },
    /// Status written with these bits (the usual way to the states).
    Status(u8),
    /// Points the selected queue at ring slot `slot` (size 16), enables it.
    PointQueue {
        slot: u8,
    },
    /// Adds `n` chains of one writable buffer to ring slot `slot`.
    Push {
        slot: u8,
        n: u8,
        len: u16,
    },
    /// The event loop serves queue `q`.
    Process(u8),
    /// The event loop handles device event source `s`.
    Event(u8),
    /// Reset, ACKNOWLEDGE, DRIVER, these features (masked to the offered
    /// ones plus VERSION_1, unless raw), FEATURES_OK.
    Negotiate {
        features: u64,
        raw: bool,
    },
    /// Adds DRIVER_OK to the status.
    DriverOk,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

const SLOT_QUEUE: u16 = 16;

fn check(h: &mut Harness) {
    assert_eq!(h.read32(REG_MAGIC_VALUE), MAGIC_VALUE);
    assert_eq!(h.read32(REG_VERSION), MMIO_VERSION);
    assert_eq!(h.read32(REG_DEVICE_ID), VIRTIO_ID_RNG);
    assert_eq!(h.read32(REG_VENDOR_ID), VENDOR_ID);
    let s = h.read32(REG_STATUS);
    let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK
        | VIRTIO_CONFIG_S_FAILED
        | VIRTIO_CONFIG_S_NEEDS_RESET;
    assert_eq!(s & !known, 0, "status {s:#x} has unknown bits");
    let irq = h.read32(REG_INTERRUPT_STATUS);
    assert_eq!(irq & !3, 0, "interrupt status {irq:#x}");
    if h.transport.is_active() {
        let need = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        assert_eq!(s & need, need, "active with status {s:#x}");
        assert_eq!(s & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "active and needs reset");
    }
}

fuzz_target!(|input: Input| {
    let mem = guest_memory();
    let mut h = Harness::with_mem(Rng::new().expect("rng timer"), mem.clone());
    let mut slots: Vec<GuestQueue<'_>> = (0..MAX_QUEUES)
        .map(|i| GuestQueue::new(&mem, RINGS + SLOT * i as u64, SLOT_QUEUE))
        .collect();
    check(&mut h);
    for op in input.ops.iter().take(256) {
        match op {
            Op::Write { reg, value, width } => {
                let width = [1usize, 2, 4, 8, 3][usize::from(*width) % 5];
                h.transport
                    .write(reg.offset(), &value.to_le_bytes()[..width]);
            }
            Op::Read { reg, width } => {
                let width = [1usize, 2, 4, 8, 3][usize::from(*width) % 5];
                let mut b = [0xa5u8; 8];
                h.transport.read(reg.offset(), &mut b[..width]);
            }
            Op::Status(v) => h.write32(REG_STATUS, u32::from(*v)),
            Op::PointQueue { slot } => {
                let q = &slots[usize::from(*slot) % MAX_QUEUES];
                let sel = h.read32(REG_QUEUE_SEL);
                h.setup_queue(sel, q);
            }
            Op::Push { slot, n, len } => {
                let q = &mut slots[usize::from(*slot) % MAX_QUEUES];
                for i in 0..u64::from(*n % 8) {
                    q.add(&[w(DATA0 + i * 0x1_0000, u32::from(*len))]);
                }
            }
            Op::Process(q) => h.kick(usize::from(*q % 4)),
            Op::Event(s) => h.transport.handle_event(usize::from(*s % 4)),
            Op::Negotiate { features, raw } => {
                let f = if *raw {
                    *features
                } else {
                    *features & h.device_features() | 1 << VIRTIO_F_VERSION_1
                };
                h.negotiate(f);
            }
            Op::DriverOk => {
                h.driver_ok();
            }
        }
        check(&mut h);
    }

    // A reset always brings the device back to its power-on state...
    h.write32(REG_STATUS, 0);
    assert_eq!(h.read32(REG_STATUS), 0);
    assert_eq!(h.read32(REG_INTERRUPT_STATUS), 0);
    assert!(!h.transport.is_active());
    // ... from which a driver brings it up and gets served.
    drop(slots);
    zero(&mem, RINGS, SLOT);
    let mut q = GuestQueue::new(&mem, RINGS, SLOT_QUEUE);
    h.activate(0, &[&q]);
    let head = q.add(&[w(DATA1, 100)]);
    h.kick(0);
    assert_eq!(q.used_idx(), 1, "request after reset not served");
    assert_eq!(q.last_used(), (u32::from(head), 100));
});
