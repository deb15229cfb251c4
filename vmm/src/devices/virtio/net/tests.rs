//! virtio-net against a socket-pair backend: the test holds the other end
//! and plays the TAP device's part.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::test_util::*;

const MAC: MacAddr = MacAddr([6, 1, 2, 3, 4, 5]);
const RXQ: u64 = 0x1_0000;
const TXQ: u64 = 0x3_0000;
const BUF: u64 = DATA + 0x10_0000;

struct Up<'a> {
    h: Harness,
    rx: GuestQueue<'a>,
    tx: GuestQueue<'a>,
    peer: File,
    mem: &'a GuestMemoryMmap,
    counters: Arc<NetCounters>,
    offloads: Arc<Mutex<Vec<u32>>>,
}

fn up_with(mem: &Arc<GuestMemoryMmap>, features: u64) -> Up<'_> {
    up_policy(mem, features, NetPolicy::OPEN)
}

fn up_policy(mem: &Arc<GuestMemoryMmap>, features: u64, policy: NetPolicy) -> Up<'_> {
    let (ours, peer) = socketpair();
    let offloads = Arc::new(Mutex::new(Vec::new()));
    let backend = SockBackend {
        file: ours,
        offloads: offloads.clone(),
    };
    let net = Net::with_backend(Box::new(backend), MAC, policy).unwrap();
    let counters = net.counters();
    let mut h = Harness::with_mem(net, mem.clone());
    let rx = GuestQueue::new(mem, RXQ, 16);
    let tx = GuestQueue::new(mem, TXQ, 16);
    h.activate(features, &[&rx, &tx]);
    Up {
        h,
        rx,
        tx,
        peer,
        mem,
        counters,
        offloads,
    }
}

fn up(mem: &Arc<GuestMemoryMmap>) -> Up<'_> {
    up_with(mem, 0)
}

/// A frame as it crosses the backend: zero header, then `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(payload);
    f
}

impl Up<'_> {
    fn send_from_host(&mut self, f: &[u8]) {
        assert_eq!(self.peer.write(f).unwrap(), f.len());
    }

    fn recv_on_host(&mut self) -> Option<Vec<u8>> {
        let mut b = vec![0u8; 70000];
        match self.peer.read(&mut b) {
            Ok(n) => Some(b[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("{e}"),
        }
    }

    fn tap_readable(&mut self) {
        self.h.transport.handle_event(0);
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// What the guest should find in its buffer for a frame the host sent.
fn delivered(f: &[u8]) -> Vec<u8> {
    let mut d = f.to_vec();
    d[10..12].copy_from_slice(&1u16.to_le_bytes());
    d
}

#[test]
fn config_has_the_mac_and_features_the_offloads() {
    let mem = guest_mem();
    let mut u = up(&mem);
    let mut mac = u.h.config(0, 4);
    mac.extend(u.h.config(4, 2));
    assert_eq!(mac, MAC.0);
    assert_eq!(u.h.config(6, 2), vec![0, 0]);
    let f = u.h.device_features();
    for bit in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
    ] {
        assert_ne!(f & 1 << bit, 0, "feature {bit}");
    }
    assert_eq!(f & 1 << VIRTIO_NET_F_MRG_RXBUF, 0);
}

#[test]
fn offloads_follow_the_acked_guest_features_and_reset_clears_them() {
    let mem = guest_mem();
    let csum_tso = 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_NET_F_GUEST_TSO6
        | 1 << VIRTIO_NET_F_GUEST_UFO;
    let mut u = up_with(&mem, csum_tso);
    let want = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO;
    assert_eq!(u.offloads.lock().unwrap().last(), Some(&want));
    u.h.write32(crate::devices::virtio::mmio::REG_STATUS, 0);
    assert_eq!(u.offloads.lock().unwrap().last(), Some(&0));
    // Segmentation without checksum offload is not offered to the TAP.
    assert_eq!(Net::tun_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
}

#[test]
fn transmits_frames_whole() {
    let mem = guest_mem();
    let mut u = up(&mem);
    let f = frame(b"hello, world: an ethernet frame of sorts");
    mem.write_slice(&f[..VNET_HDR_LEN], GuestAddress(BUF))
        .unwrap();
    mem.write_slice(&f[VNET_HDR_LEN..], GuestAddress(BUF + 0x1000))
        .unwrap();
    let head = u.tx.add(&[
        r(BUF, u32_of(VNET_HDR_LEN)),
        r(BUF + 0x1000, u32_of(f.len() - VNET_HDR_LEN)),
    ]);
    u.h.kick(1);
    assert_eq!(u.recv_on_host(), Some(f.clone()));
    assert_eq!(u.tx.last_used(), (u32::from(head), 0));
    assert_eq!(u.h.take_irq(), 1);
    assert_eq!(u.counters.tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(
        u.counters.tx_bytes.load(Ordering::Relaxed),
        (f.len() - VNET_HDR_LEN) as u64
    );
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mem = guest_mem();
    let mut u = up(&mem);
    let max = u32_of(VNET_HDR_LEN + MAX_FRAME_LEN);
    u.tx.add(&[r(BUF, 11)]); // shorter than the header
    u.tx.add(&[r(BUF, max + 1)]); // longer than 64 KiB + header
    u.tx.add(&[r(BUF, 60), w(BUF + 0x2_0000, 60)]); // writable buffer
    u.tx.add(&[r(FAR, 60)]); // outside guest memory
    u.tx.add(&[r(BUF, max)]); // the largest frame is fine
    u.h.kick(1);
    assert_eq!(u.tx.used_idx(), 5);
    assert_eq!(u.counters.tx_malformed.load(Ordering::Relaxed), 4);
    assert_eq!(u.recv_on_host().map(|f| f.len()), Some(max as usize));
    assert_eq!(u.recv_on_host(), None);
}

#[test]
fn receives_frames_into_guest_buffers() {
    let mem = guest_mem();
    let mut u = up(&mem);
    let f = frame(&[0x5a; 100]);
    let head = u.rx.add(&[w(BUF, 64), w(BUF + 0x1000, 1600)]);
    u.send_from_host(&f);
    u.tap_readable();
    assert_eq!(u.rx.last_used(), (u32::from(head), u32_of(f.len())));
    let mut got = u.guest(BUF, 64);
    got.extend(u.guest(BUF + 0x1000, f.len() - 64));
    assert_eq!(got, delivered(&f), "num_buffers is 1");
    assert_eq!(u.h.take_irq(), 1);
    assert_eq!(u.counters.rx_frames.load(Ordering::Relaxed), 1);
}

#[test]
fn rx_waits_for_guest_buffers_and_resumes_on_notification() {
    let mem = guest_mem();
    let mut u = up(&mem);
    let frames: Vec<Vec<u8>> = (0..3u8).map(|i| frame(&[i; 50])).collect();
    for f in &frames {
        u.send_from_host(f);
    }
    u.rx.add(&[w(BUF, 2048)]);
    u.tap_readable();
    assert_eq!(u.rx.used_idx(), 1);
    // No buffers: the device returns (no spinning) and keeps the frames.
    u.tap_readable();
    assert_eq!(u.rx.used_idx(), 1);
    u.rx.add(&[w(BUF + 0x1000, 2048)]);
    u.rx.add(&[w(BUF + 0x2000, 2048)]);
    u.h.kick(0);
    assert_eq!(u.rx.used_idx(), 3);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            u.guest(BUF + 0x1000 * i as u64, f.len()),
            delivered(f),
            "frame {i} in order"
        );
    }
    assert_eq!(u.counters.rx_dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn frames_that_do_not_fit_are_dropped_and_the_buffer_returned_empty() {
    let mem = guest_mem();
    let mut u = up(&mem);
    let big = frame(&[1; 200]);
    let small = frame(&[2; 20]);
    u.send_from_host(&big);
    u.send_from_host(&small);
    let first = u.rx.add(&[w(BUF, 100)]);
    let second = u.rx.add(&[w(BUF + 0x1000, 100)]);
    u.tap_readable();
    assert_eq!(u.rx.used_idx(), 2);
    assert_eq!(u.rx.used(0), (u32::from(first), 0));
    assert_eq!(u.rx.used(1), (u32::from(second), u32_of(small.len())));
    assert_eq!(u.guest(BUF + 0x1000, small.len()), delivered(&small));
    assert_eq!(u.counters.rx_dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn unusable_rx_chains_are_returned_empty_and_the_frame_kept() {
    let mem = guest_mem();
    let mut u = up(&mem);
    let f = frame(&[3; 30]);
    u.send_from_host(&f);
    u.rx.add(&[r(BUF, 2048)]);
    u.rx.add(&[w(FAR, 2048)]);
    u.rx.add(&[w(BUF, 8)]);
    u.rx.add(&[r(BUF, 16), w(BUF + 0x100, 2048)]);
    let good = u.rx.add(&[w(BUF + 0x1000, 2048)]);
    u.tap_readable();
    assert_eq!(u.rx.used_idx(), 5);
    for i in 0..4 {
        assert_eq!(u.rx.used(i).1, 0, "chain {i}");
    }
    assert_eq!(u.rx.used(4), (u32::from(good), u32_of(f.len())));
    assert_eq!(u.counters.rx_bad_chains.load(Ordering::Relaxed), 4);
}

#[test]
fn frames_wait_while_the_device_is_inactive() {
    let mem = guest_mem();
    let (ours, mut peer) = socketpair();
    let backend = SockBackend {
        file: ours,
        offloads: Arc::default(),
    };
    let mut h = Harness::with_mem(
        Net::with_backend(Box::new(backend), MAC, NetPolicy::OPEN).unwrap(),
        mem.clone(),
    );
    let f = frame(&[9; 40]);
    peer.write_all(&f).unwrap();
    h.transport.handle_event(0);
    let mut rx = GuestQueue::new(&mem, RXQ, 16);
    let tx = GuestQueue::new(&mem, TXQ, 16);
    rx.add(&[w(BUF, 2048)]);
    h.activate(0, &[&rx, &tx]);
    // Activation kicked the RX queue's EventFd; the event loop would run:
    h.kick(0);
    assert_eq!(rx.last_used().1, u32_of(f.len()));
}

#[test]
fn survives_hostile_tx_chains() {
    let mem = guest_mem();
    let Up {
        mut h,
        mut tx,
        mut peer,
        ..
    } = up(&mem);
    let f = frame(b"marker frame");
    mem.write_slice(&f, GuestAddress(BUF + 0x8000)).unwrap();
    hostile_battery(&mut h, &mut tx, &mut |h| h.kick(1), &mut |h, q| {
        let mut b = vec![0u8; 70000];
        while peer.read(&mut b).is_ok() {}
        q.add(&[r(BUF + 0x8000, u32_of(f.len()))]);
        h.kick(1);
        let n = peer.read(&mut b).unwrap();
        assert_eq!(&b[..n], &f[..]);
    });
}

#[test]
fn survives_hostile_rx_chains() {
    let mem = guest_mem();
    let Up {
        mut h,
        mut rx,
        peer,
        ..
    } = up(&mem);
    let peer = std::cell::RefCell::new(peer);
    let noise = frame(&[0xee; 40]);
    let marker = frame(b"the marker frame");
    hostile_battery(
        &mut h,
        &mut rx,
        &mut |h| {
            peer.borrow_mut().write_all(&noise).unwrap();
            h.transport.handle_event(0);
        },
        &mut |h, q| {
            peer.borrow_mut().write_all(&marker).unwrap();
            // Earlier noise may still be queued ahead of the marker.
            let found = (0..8u64).any(|i| {
                let addr = BUF + 0x10000 + i * 0x1000;
                mem.write_slice(&[0u8; 64], GuestAddress(addr)).unwrap();
                q.add(&[w(addr, 2048)]);
                h.kick(0);
                let mut got = vec![0u8; marker.len()];
                mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
                got == delivered(&marker)
            });
            assert!(found, "marker frame not delivered");
        },
    );
}

/// An Ethernet frame from `src` to the broadcast address, as the guest
/// puts it in guest memory at `at` (virtio header first); returns its TX
/// descriptor.
fn guest_frame(mem: &GuestMemoryMmap, at: u64, src: [u8; 6]) -> Desc {
    let mut eth = vec![0xffu8; 6];
    eth.extend_from_slice(&src);
    eth.extend_from_slice(&[0x08, 0x00]);
    eth.extend_from_slice(b"payload");
    let f = frame(&eth);
    mem.write_slice(&f, GuestAddress(at)).unwrap();
    r(at, u32_of(f.len()))
}

#[test]
fn frames_from_another_source_mac_are_dropped_and_counted() {
    let mem = guest_mem();
    let policy = NetPolicy {
        filter_source_mac: true,
        ..NetPolicy::OPEN
    };
    let mut u = up_policy(&mem, 0, policy);
    let own = guest_frame(&mem, BUF, MAC.0);
    let forged = guest_frame(&mem, BUF + 0x1000, [6, 6, 6, 6, 6, 6]);
    let h1 = u.tx.add(&[forged]);
    let h2 = u.tx.add(&[own]);
    u.h.kick(1);
    let got = u.recv_on_host().expect("the guest's own frame goes out");
    assert_eq!(&got[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12], &MAC.0);
    assert_eq!(u.recv_on_host(), None, "the forged frame must not");
    assert_eq!(u.tx.used(0).0, u32::from(h1), "still returned to the guest");
    assert_eq!(u.tx.used(1).0, u32::from(h2));
    assert_eq!(u.counters.tx_spoofed.load(Ordering::Relaxed), 1);
    assert_eq!(u.counters.tx_frames.load(Ordering::Relaxed), 1);
    // A runt without a whole source address is no exception.
    let runt = frame(&[0xff; 8]);
    mem.write_slice(&runt, GuestAddress(BUF + 0x2000)).unwrap();
    u.tx.add(&[r(BUF + 0x2000, u32_of(runt.len()))]);
    u.h.kick(1);
    assert_eq!(u.recv_on_host(), None);
    assert_eq!(u.counters.tx_spoofed.load(Ordering::Relaxed), 2);
}

#[test]
fn a_frame_rate_limit_holds_tx_chains_until_its_timer() {
    let mem = guest_mem();
    let policy = NetPolicy {
        limits: Limits {
            bytes_per_s: None,
            ops_per_s: Some(3),
        },
        filter_source_mac: true,
    };
    let mut u = up_policy(&mem, 0, policy);
    for i in 0..5 {
        let d = guest_frame(&mem, BUF + i * 0x1000, MAC.0);
        u.tx.add(&[d]);
    }
    u.h.kick(1);
    let mut sent = 0;
    while u.recv_on_host().is_some() {
        sent += 1;
    }
    assert_eq!(sent, 3, "a full bucket: one second of 3 frames/s");
    assert_eq!(u.tx.used_idx(), 3);
    let sources = u.h.transport.event_sources();
    assert_eq!(sources.len(), 3, "TAP, RX timer, TX timer");
    assert!(wait_readable(sources[2].fd, 2000), "TX timer never fired");
    u.h.transport.handle_event(2);
    assert_eq!(u.tx.used_idx(), 4, "one more frame after ~1/3 s");
    let counters: std::collections::HashMap<_, _> =
        u.h.transport.device_mut().counters().into_iter().collect();
    assert!(counters["tx_throttled_ms"] >= 200, "{counters:?}");
    assert_eq!(counters["rx_throttled_ms"], 0);
}
