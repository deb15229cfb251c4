use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use super::*;
use crate::devices::virtio::device::{read_config_bytes, ActivateError};
use crate::devices::virtio::queue::drain;
use crate::devices::virtio::test_util::*;
use crate::devices::virtio::COMMON_FEATURES;

const DUMMY_ID: u32 = 42;
const DUMMY_FEATURE: u64 = 1 << 5;

#[derive(Default)]
struct Log {
    activated: Vec<u64>,
    resets: usize,
    notified: Vec<usize>,
    config_writes: Vec<(u64, Vec<u8>)>,
    fail_activation: bool,
    /// Available ring to refill with head 0 for every chain served.
    refill: Option<u64>,
}

struct Dummy(Arc<Mutex<Log>>);

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        DUMMY_ID
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES | DUMMY_FEATURE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(
            &[0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17],
            offset,
            data,
        );
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, acked: u64) -> Result<(), ActivateError> {
        let mut log = self.0.lock().unwrap();
        if log.fail_activation {
            return Err(ActivateError::Backend(std::io::Error::other("no")));
        }
        log.activated.push(acked);
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().resets += 1;
    }
    fn queue_notify(&mut self, index: usize, ctx: &mut QueueCtx<'_>) {
        let refill = {
            let mut log = self.0.lock().unwrap();
            log.notified.push(index);
            log.refill
        };
        drain(ctx, index, |mem, _| {
            if let Some(avail) = refill {
                use vm_memory::{Bytes, GuestAddress};
                let idx: u16 = mem.read_obj(GuestAddress(avail + 2)).unwrap();
                mem.write_obj(0u16, GuestAddress(avail + 4 + 2 * u64::from(idx % 16)))
                    .unwrap();
                mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
                    .unwrap();
            }
            0
        });
    }
}

fn dummy() -> (Harness, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    (Harness::new(Dummy(log.clone())), log)
}

const V1: u64 = 1 << VIRTIO_F_VERSION_1;

#[test]
fn identifies_itself_as_a_modern_device() {
    let (mut h, _) = dummy();
    assert_eq!(h.read32(REG_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(h.read32(REG_VERSION), 2);
    assert_eq!(h.read32(REG_DEVICE_ID), DUMMY_ID);
    assert_eq!(h.read32(REG_VENDOR_ID), VENDOR_ID);
    assert_eq!(h.device_features(), COMMON_FEATURES | DUMMY_FEATURE);
    h.write32(REG_DEVICE_FEATURES_SEL, 2);
    assert_eq!(h.read32(REG_DEVICE_FEATURES), 0);
    assert_eq!(h.read32(REG_SHM_LEN_LOW), u32::MAX, "no shared memory");
    assert_eq!(h.read32(REG_STATUS), 0);
}

#[test]
fn reports_queue_maxima_and_zero_for_absent_queues() {
    let (mut h, _) = dummy();
    h.write32(REG_QUEUE_SEL, 0);
    assert_eq!(h.read32(REG_QUEUE_NUM_MAX), 16);
    h.write32(REG_QUEUE_SEL, 1);
    assert_eq!(h.read32(REG_QUEUE_NUM_MAX), 8);
    h.write32(REG_QUEUE_SEL, 2);
    assert_eq!(h.read32(REG_QUEUE_NUM_MAX), 0);
    assert_eq!(h.read32(REG_QUEUE_READY), 0);
}

#[test]
fn negotiates_features_and_requires_version_1() {
    let (mut h, _) = dummy();
    let s = h.negotiate(V1 | DUMMY_FEATURE);
    assert_ne!(s & S_FEATURES_OK, 0);

    let s = h.negotiate(DUMMY_FEATURE);
    assert_eq!(s & S_FEATURES_OK, 0, "legacy driver must be refused");
    assert_eq!(s, S_ACK | S_DRIVER);

    let s = h.negotiate(V1 | 1 << 40);
    assert_eq!(s & S_FEATURES_OK, 0, "unoffered feature acked");

    // Acks in feature words past the second.
    h.write32(REG_STATUS, 0);
    h.write32(REG_STATUS, S_ACK);
    h.write32(REG_STATUS, S_ACK | S_DRIVER);
    h.write32(REG_DRIVER_FEATURES_SEL, 1);
    h.write32(REG_DRIVER_FEATURES, 1);
    h.write32(REG_DRIVER_FEATURES_SEL, 5);
    h.write32(REG_DRIVER_FEATURES, 1);
    h.write32(REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(h.read32(REG_STATUS) & S_FEATURES_OK, 0);
}

#[test]
fn feature_writes_outside_negotiation_are_ignored() {
    let (mut h, log) = dummy();
    // Before DRIVER: ignored.
    h.write32(REG_DRIVER_FEATURES_SEL, 1);
    h.write32(REG_DRIVER_FEATURES, 1);
    h.write32(REG_STATUS, S_ACK);
    h.write32(REG_STATUS, S_ACK | S_DRIVER);
    h.write32(REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(
        h.read32(REG_STATUS) & S_FEATURES_OK,
        0,
        "VERSION_1 was never acked"
    );

    let mem = h.mem.clone();
    let q = GuestQueue::new(&mem, 0x1_0000, 16);
    h.activate(0, &[&q]);
    // After FEATURES_OK the driver cannot change its mind.
    h.write32(REG_DRIVER_FEATURES_SEL, 0);
    h.write32(REG_DRIVER_FEATURES, u32::try_from(DUMMY_FEATURE).unwrap());
    assert_eq!(log.lock().unwrap().activated, vec![V1]);
}

#[test]
fn status_bits_must_come_in_order_and_never_clear() {
    let (mut h, log) = dummy();
    h.write32(REG_STATUS, S_DRIVER);
    assert_eq!(h.read32(REG_STATUS), 0, "DRIVER before ACKNOWLEDGE");
    h.write32(REG_STATUS, S_ACK);
    h.write32(REG_STATUS, S_ACK | S_FEATURES_OK);
    assert_eq!(h.read32(REG_STATUS), S_ACK, "FEATURES_OK before DRIVER");
    h.write32(REG_STATUS, S_ACK | S_DRIVER | S_DRIVER_OK);
    assert_eq!(
        h.read32(REG_STATUS),
        S_ACK | S_DRIVER,
        "DRIVER_OK before FEATURES_OK"
    );
    assert!(log.lock().unwrap().activated.is_empty());
    h.write32(REG_STATUS, S_DRIVER);
    assert_eq!(h.read32(REG_STATUS), S_ACK | S_DRIVER, "clearing ACK");
    h.write32(REG_STATUS, S_ACK | S_DRIVER | 0x100);
    assert_eq!(h.read32(REG_STATUS), S_ACK | S_DRIVER, "unknown bit");
    h.write32(REG_STATUS, S_ACK | S_DRIVER | S_NEEDS_RESET);
    assert_eq!(
        h.read32(REG_STATUS),
        S_ACK | S_DRIVER,
        "NEEDS_RESET is the device's"
    );
    h.write32(REG_STATUS, S_ACK | S_DRIVER | S_FAILED);
    assert_eq!(h.read32(REG_STATUS), S_ACK | S_DRIVER | S_FAILED);
}

#[test]
fn queue_setup_is_validated() {
    let (mut h, _) = dummy();
    h.write32(REG_QUEUE_SEL, 0);
    h.write32(REG_QUEUE_NUM, 8);
    h.write32(REG_QUEUE_READY, 1);
    assert_eq!(
        h.read32(REG_QUEUE_READY),
        0,
        "queue setup before FEATURES_OK"
    );

    h.negotiate(V1);
    for bad in [0, 3, 12, 32, 0x1_0008] {
        h.write32(REG_QUEUE_NUM, bad);
    }
    h.write32(REG_QUEUE_DESC_LOW, 0x1_0008);
    h.write32(REG_QUEUE_DRIVER_LOW, 0x2_0001);
    h.write32(REG_QUEUE_DEVICE_LOW, 0x3_0002);
    assert_eq!(h.transport.queues[0].size(), 16, "bad sizes ignored");
    assert_eq!(h.read32(REG_QUEUE_DESC_LOW), 0, "misaligned table ignored");
    assert_eq!(
        h.read32(REG_QUEUE_DRIVER_LOW),
        0,
        "misaligned avail ignored"
    );
    assert_eq!(h.read32(REG_QUEUE_DEVICE_LOW), 0, "misaligned used ignored");

    h.write32(REG_QUEUE_NUM, 4);
    h.write32(REG_QUEUE_DESC_LOW, 0x1_0000);
    h.write32(REG_QUEUE_DESC_HIGH, 0);
    h.write32(REG_QUEUE_DRIVER_LOW, 0x1_1000);
    h.write32(REG_QUEUE_DEVICE_LOW, 0x1_2000);
    h.write32(REG_QUEUE_READY, 1);
    assert_eq!(h.read32(REG_QUEUE_READY), 1);
    // An enabled queue cannot be moved.
    h.write32(REG_QUEUE_NUM, 8);
    h.write32(REG_QUEUE_DESC_LOW, 0x5_0000);
    assert_eq!(h.transport.queues[0].size(), 4);
    assert_eq!(h.read32(REG_QUEUE_DESC_LOW), 0x1_0000);
    // Writes to a queue that does not exist go nowhere.
    h.write32(REG_QUEUE_SEL, 7);
    h.write32(REG_QUEUE_NUM, 4);
    h.write32(REG_QUEUE_READY, 1);
    assert_eq!(h.read32(REG_QUEUE_READY), 0);
}

#[test]
fn queue_addresses_take_both_halves() {
    let (mut h, _) = dummy();
    h.negotiate(V1);
    h.write32(REG_QUEUE_DESC_LOW, 0x1000);
    h.write32(REG_QUEUE_DESC_HIGH, 0x2);
    assert_eq!(h.transport.queues[0].desc_table(), 0x2_0000_1000);
    assert_eq!(h.read32(REG_QUEUE_DESC_HIGH), 2);
}

#[test]
fn wrong_width_and_unaligned_accesses_are_ignored() {
    let (mut h, _) = dummy();
    let mut b2 = [0xffu8; 2];
    h.transport.read(REG_MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b4 = [0xffu8; 4];
    h.transport.read(REG_MAGIC_VALUE + 1, &mut b4);
    assert_eq!(b4, [0; 4]);
    h.transport.write(REG_STATUS, &[1]);
    h.transport.write(REG_STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    h.transport.write(REG_STATUS + 2, &[1, 0, 0, 0]);
    assert_eq!(h.read32(REG_STATUS), 0);
    // Unknown registers read as zero and ignore writes.
    assert_eq!(h.read32(0x0e0), 0);
    h.write32(0x0e0, 5);
    // Legacy (version 1) registers do nothing.
    h.write32(0x028, 4096);
    h.write32(0x040, 1);
}

#[test]
fn config_space_reads_at_any_width_and_writes_reach_the_device() {
    let (mut h, log) = dummy();
    assert_eq!(h.config(0, 1), vec![0x10]);
    assert_eq!(h.config(2, 2), vec![0x12, 0x13]);
    assert_eq!(h.config(4, 4), vec![0x14, 0x15, 0x16, 0x17]);
    assert_eq!(h.config(0, 8), (0x10..0x18).collect::<Vec<u8>>());
    assert_eq!(
        h.config(6, 4),
        vec![0x16, 0x17, 0, 0],
        "past the end reads 0"
    );
    assert_eq!(h.config(0, 3), vec![0, 0, 0], "odd width refused");
    assert_eq!(h.config(0xf00, 4), vec![0; 4]);
    h.transport.write(REG_CONFIG + 4, &[9, 9]);
    h.transport.write(REG_CONFIG + 4, &[9, 9, 9]);
    assert_eq!(log.lock().unwrap().config_writes, vec![(4, vec![9, 9])]);
}

#[test]
fn driver_ok_activates_with_the_acked_features_and_kicks_ready_queues() {
    let (mut h, log) = dummy();
    let mem = h.mem.clone();
    let q = GuestQueue::new(&mem, 0x1_0000, 16);
    h.activate(DUMMY_FEATURE, &[&q]);
    assert_eq!(log.lock().unwrap().activated, vec![V1 | DUMMY_FEATURE]);
    // Queue 0 is ready, queue 1 is not: only queue 0 was kicked.
    assert_eq!(h.transport.queue_evts[0].read().unwrap(), 1);
    assert!(h.transport.queue_evts[1].read().is_err());
    // Writing DRIVER_OK again does not re-activate.
    let s = h.read32(REG_STATUS);
    h.write32(REG_STATUS, s);
    assert_eq!(log.lock().unwrap().activated.len(), 1);
    // Queue configuration is frozen after DRIVER_OK.
    h.write32(REG_QUEUE_SEL, 1);
    h.write32(REG_QUEUE_NUM, 4);
    h.write32(REG_QUEUE_READY, 1);
    assert_eq!(h.read32(REG_QUEUE_READY), 0);
}

#[test]
fn event_idx_is_applied_to_the_queues_when_negotiated() {
    let (mut h, _) = dummy();
    let mem = h.mem.clone();
    let q = GuestQueue::new(&mem, 0x1_0000, 16);
    h.activate(
        1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
        &[&q],
    );
    assert!(h.transport.queues[0].event_idx_enabled());
}

#[test]
fn notify_register_forwards_to_the_queue_eventfd() {
    let (mut h, _) = dummy();
    h.write32(REG_QUEUE_NOTIFY, 1);
    assert_eq!(h.transport.queue_evts[1].read().unwrap(), 1);
    h.write32(REG_QUEUE_NOTIFY, 2);
    h.write32(REG_QUEUE_NOTIFY, u32::MAX);
}

#[test]
fn queues_are_served_only_while_active() {
    let (mut h, log) = dummy();
    let mem = h.mem.clone();
    let mut q = GuestQueue::new(&mem, 0x1_0000, 16);
    h.kick(0);
    assert!(log.lock().unwrap().notified.is_empty());
    h.activate(0, &[&q]);
    q.add(&[w(DATA, 8)]);
    h.kick(0);
    h.kick(5);
    assert_eq!(log.lock().unwrap().notified, vec![0]);
    assert_eq!(q.used_idx(), 1);
    assert_eq!(h.take_irq(), 1);
    assert_eq!(h.read32(REG_INTERRUPT_STATUS), 1);
    h.write32(REG_INTERRUPT_ACK, 1);
    assert_eq!(h.read32(REG_INTERRUPT_STATUS), 0);
}

#[test]
fn queues_outside_guest_memory_fail_activation() {
    let (mut h, log) = dummy();
    h.negotiate(V1);
    h.write32(REG_QUEUE_SEL, 0);
    h.write32(REG_QUEUE_DESC_LOW, 0);
    h.write32(REG_QUEUE_DESC_HIGH, 0x100);
    h.write32(REG_QUEUE_DRIVER_LOW, 0x1000);
    h.write32(REG_QUEUE_DEVICE_LOW, 0x2000);
    h.write32(REG_QUEUE_READY, 1);
    let s = h.driver_ok();
    assert_ne!(s & S_NEEDS_RESET, 0);
    assert!(!h.transport.is_active());
    assert!(log.lock().unwrap().activated.is_empty());
    assert_eq!(h.read32(REG_INTERRUPT_STATUS), 2, "config change interrupt");
    assert_eq!(h.read32(REG_CONFIG_GENERATION), 1);

    // A used ring that ends just past the end of memory.
    let end = u32::try_from(MEM_SIZE).unwrap();
    h.negotiate(V1);
    h.write32(REG_QUEUE_SEL, 0);
    h.write32(REG_QUEUE_DESC_LOW, 0x1000);
    h.write32(REG_QUEUE_DRIVER_LOW, 0x2000);
    h.write32(REG_QUEUE_DEVICE_LOW, end - 8);
    h.write32(REG_QUEUE_READY, 1);
    assert_ne!(h.driver_ok() & S_NEEDS_RESET, 0);
}

#[test]
fn failed_activation_needs_reset_and_reset_recovers() {
    let (mut h, log) = dummy();
    log.lock().unwrap().fail_activation = true;
    let mem = h.mem.clone();
    let q = GuestQueue::new(&mem, 0x1_0000, 16);
    h.negotiate(V1);
    h.setup_queue(0, &q);
    assert_ne!(h.driver_ok() & S_NEEDS_RESET, 0);
    log.lock().unwrap().fail_activation = false;
    h.activate(0, &[&q]);
    assert_eq!(
        h.read32(REG_STATUS) & S_NEEDS_RESET,
        0,
        "reset clears NEEDS_RESET"
    );
}

#[test]
fn reset_forgets_everything() {
    let (mut h, log) = dummy();
    let mem = h.mem.clone();
    let q = GuestQueue::new(&mem, 0x1_0000, 16);
    h.activate(DUMMY_FEATURE, &[&q]);
    h.transport.interrupt().signal_used_queue();
    h.write32(REG_QUEUE_SEL, 1);
    let resets = log.lock().unwrap().resets;
    h.write32(REG_STATUS, 0);
    assert_eq!(log.lock().unwrap().resets, resets + 1);
    assert_eq!(h.read32(REG_STATUS), 0);
    assert_eq!(h.read32(REG_INTERRUPT_STATUS), 0);
    assert!(!h.transport.is_active());
    assert_eq!(h.read32(REG_QUEUE_NUM_MAX), 16, "QueueSel back to 0");
    assert_eq!(h.read32(REG_QUEUE_READY), 0);
    assert_eq!(h.read32(REG_QUEUE_DESC_LOW), 0);
    assert_eq!(h.transport.queues[0].next_avail(), 0);
    assert_eq!(h.transport.driver_features, 0);
    // A stopped device serves nothing even if notified.
    h.kick(0);
    assert!(log.lock().unwrap().notified.is_empty());
}

#[test]
fn corrupt_ring_stops_the_device_until_reset() {
    let (mut h, log) = dummy();
    let mem = h.mem.clone();
    let mut q = GuestQueue::new(&mem, 0x1_0000, 16);
    h.activate(0, &[&q]);
    hostile_battery(&mut h, &mut q, &mut |h| h.kick(0), &mut |h, q| {
        q.add(&[w(DATA, 8)]);
        let before = q.used_idx();
        h.kick(0);
        assert_eq!(q.used_idx(), before.wrapping_add(1));
    });
    assert_ne!(h.read32(REG_INTERRUPT_STATUS) & 2, 0);
    let served = log.lock().unwrap().notified.len();
    h.kick(0);
    assert_eq!(
        log.lock().unwrap().notified.len(),
        served,
        "stopped device served a queue"
    );
    // Driver resets and starts over.
    let q2 = GuestQueue::new(&mem, 0x3_0000, 16);
    h.activate(0, &[&q2]);
    assert!(h.transport.is_active());
}

#[test]
fn busy_queue_yields_after_its_budget() {
    let (mut h, log) = dummy();
    let mem = h.mem.clone();
    let mut q = GuestQueue::new(&mem, 0x1_0000, 16);
    h.activate(0, &[&q]);
    let _ = h.transport.queue_evts[0].read();
    q.add(&[w(DATA, 8)]);
    // A guest on another vCPU that refills the ring as fast as the device
    // empties it: without a budget the device would never return.
    log.lock().unwrap().refill = Some(q.mock.avail_addr().0);
    h.kick(0);
    let budget = u16::try_from(crate::devices::virtio::queue::CHAIN_BUDGET).unwrap();
    assert_eq!(q.used_idx(), budget);
    assert_eq!(
        h.transport.queue_evts[0].read().unwrap(),
        1,
        "requeued itself"
    );
    assert_eq!(h.take_irq(), 1);
    h.kick(0);
    assert_eq!(q.used_idx(), 2 * budget);
}
