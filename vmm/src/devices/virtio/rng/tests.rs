use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::test_util::*;

fn rng_up(mem: &Arc<GuestMemoryMmap>) -> (Harness, GuestQueue<'_>, Arc<RngCounters>) {
    let rng = Rng::new().unwrap();
    let counters = rng.counters();
    let mut h = Harness::with_mem(rng, mem.clone());
    let q = GuestQueue::new(mem, 0x1_0000, 16);
    h.activate(0, &[&q]);
    (h, q, counters)
}

fn is_random(buf: &[u8]) -> bool {
    // 32 zero bytes from getrandom happen with probability 2^-256.
    buf.iter().any(|&b| b != 0)
}

#[test]
fn fills_every_writable_buffer_and_interrupts() {
    let mem = guest_mem();
    let (mut h, mut q, counters) = rng_up(&mem);
    let head = q.add(&[w(DATA, 32), w(DATA + 0x1000, 32)]);
    h.kick(0);
    assert_eq!(q.used_idx(), 1);
    assert_eq!(q.last_used(), (u32::from(head), 64));
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut b, GuestAddress(DATA + 0x1000)).unwrap();
    assert!(is_random(&a) && is_random(&b));
    assert_ne!(a, b);
    assert_eq!(h.take_irq(), 1);
    assert_eq!(counters.bytes.load(Ordering::Relaxed), 64);
}

#[test]
fn caps_huge_requests() {
    let mem = guest_mem();
    let (mut h, mut q, _) = rng_up(&mem);
    q.add(&[w(DATA, 4 << 20)]);
    h.kick(0);
    assert_eq!(q.last_used().1, u32_of(MAX_BYTES_PER_REQUEST));
}

#[test]
fn chains_without_writable_buffers_are_returned_empty() {
    let mem = guest_mem();
    let (mut h, mut q, counters) = rng_up(&mem);
    let head = q.add(&[r(DATA, 32)]);
    h.kick(0);
    assert_eq!(q.last_used(), (u32::from(head), 0));
    assert_eq!(counters.bad_chains.load(Ordering::Relaxed), 1);
}

#[test]
fn serves_a_batch_with_one_interrupt() {
    let mem = guest_mem();
    let (mut h, mut q, _) = rng_up(&mem);
    for i in 0..8 {
        q.add(&[w(DATA + i * 64, 64)]);
    }
    h.kick(0);
    assert_eq!(q.used_idx(), 8);
    assert_eq!(h.take_irq(), 1);
}

#[test]
fn survives_hostile_chains() {
    let mem = guest_mem();
    let (mut h, mut q, _) = rng_up(&mem);
    hostile_battery(&mut h, &mut q, &mut |h| h.kick(0), &mut |h, q| {
        let head = q.add(&[w(DATA + 0x4000, 16)]);
        h.kick(0);
        assert_eq!(q.last_used(), (u32::from(head), 16));
    });
}

#[test]
fn works_again_after_a_reset() {
    let mem = guest_mem();
    let (mut h, q, _) = rng_up(&mem);
    q.set_avail_idx(100);
    h.kick(0);
    assert!(!h.transport.is_active());
    let mut q2 = GuestQueue::new(&mem, 0x2_0000, 16);
    h.activate(0, &[&q2]);
    q2.add(&[w(DATA, 8)]);
    h.kick(0);
    assert_eq!(q2.last_used().1, 8);
}
