//! virtio-net: TX chains of any shape, and RX buffers of any shape meeting
//! frames from the host, against the real device on a socket-pair backend
//! (frame boundaries survive, as on a TAP fd).
//!
//! TX: every chain comes back with used length 0; the backend receives
//! exactly the readable bytes of the well-formed chains (only readable,
//! all in guest memory, 12..=12+65554 bytes), in order, and nothing of the
//! others; the counters add up; the device writes nothing into guest
//! memory but the used ring.
//!
//! RX: a model of the documented behaviour predicts every used entry
//! (delivered: the frame's length, its bytes in the buffers with
//! num_buffers = 1; too small: dropped, length 0; readable or unusable
//! buffers: returned empty, the frame waits), and nothing outside the
//! writable buffers and the used ring changes.
//!
//! Afterwards a well-formed frame goes out and one comes in, before and
//! after a reset.

#![no_main]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use ksmvm::devices::virtio::net::{NetCounters, NetPolicy, MAX_FRAME_LEN, VNET_HDR_LEN};
use ksmvm::devices::virtio::test_util::{socketpair, Harness, SockBackend};
use ksmvm::devices::virtio::{MacAddr, Net};
use ksmvm_fuzz::*;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;

#[derive(Arbitrary, Debug, Clone)]
enum Frame {
    Bytes(Vec<u8>),
    /// A frame of this many bytes (header included) of one value.
    Sized(u16, u8),
}

impl Frame {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Frame::Bytes(b) => b.clone(),
            Frame::Sized(n, v) => vec![*v; usize::from(*n)],
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Tx(Batch<RawBytes>),
    Rx {
        buffers: Batch<RawBytes>,
        frames: Vec<Frame>,
        /// Kick through the TAP fd's readiness instead of the guest's
        /// notification.
        by_event: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    features: u64,
    rx_size: u8,
    tx_size: u8,
    chaos: bool,
    ops: Vec<Op>,
}

struct Net2<'m> {
    d: Driver<'m>,
    peer: File,
    /// The device's end of the pair (a dup), to empty it on reset.
    ours: File,
    counters: Arc<NetCounters>,
    /// Frames (>= header size) on their way to the guest, oldest first; the
    /// first may be held by the device already.
    fifo: VecDeque<Vec<u8>>,
    filler: u64,
}

fn drain(f: &mut File) -> Vec<Vec<u8>> {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> =
            std::cell::RefCell::new(vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN + 16]);
    }
    BUF.with(|b| drain_into(f, &mut b.borrow_mut()))
}

fn drain_into(f: &mut File, b: &mut [u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        match f.read(b) {
            Ok(n) => out.push(b[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("reading the socket pair: {e}"),
        }
    }
}

/// Is `sub` a subsequence of `all`?
fn subsequence(sub: &[Vec<u8>], all: &[Vec<u8>]) -> bool {
    let mut it = all.iter();
    sub.iter().all(|s| it.any(|a| a == s))
}

impl Net2<'_> {
    fn reset(&mut self) {
        self.d.reset_and_reactivate();
        drain(&mut self.ours);
        drain(&mut self.peer);
        self.fifo.clear();
    }

    fn tx(&mut self, batch: &Batch<RawBytes>) {
        let mut b = batch.clone();
        b.queue = TX as u8;
        let (q, sub) = self.d.submit(&b);
        let used_before = self.d.queues[q].gq.used_idx();
        let c = &self.counters;
        let before =
            [&c.tx_frames, &c.tx_errors, &c.tx_malformed].map(|a| a.load(Ordering::Relaxed));
        let snap = (!self.d.chaos).then(|| Snapshot::take(self.d.mem));
        // What a well-formed chain sends: its readable bytes.
        let expected: Vec<Vec<u8>> = match &sub {
            Submitted::Chains(chains) => chains
                .iter()
                .filter(|w| !w.info.descs.iter().any(|d| d.2))
                .filter_map(|w| {
                    let mut r = w.chain.clone().reader(self.d.mem).ok()?;
                    let n = r.available_bytes();
                    if !(VNET_HDR_LEN..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&n) {
                        return None;
                    }
                    let mut f = vec![0u8; n];
                    r.read_exact(&mut f).ok()?;
                    Some(f)
                })
                .collect(),
            Submitted::Corrupt => Vec::new(),
        };
        self.d.h.kick(q);
        let got = drain(&mut self.peer);
        if self.d.chaos {
            if !self.d.is_active() {
                self.reset();
            }
            return;
        }
        let chains = match sub {
            Submitted::Corrupt => {
                assert!(
                    !self.d.is_active() && self.d.needs_reset(),
                    "corrupt TX ring: still active"
                );
                assert!(got.is_empty(), "frames sent from a corrupt ring");
                self.reset();
                return;
            }
            Submitted::Chains(c) => c,
        };
        assert!(self.d.is_active(), "device stopped without a corrupt ring");
        let used = self.d.check_used(
            q,
            used_before,
            &all_returned(&chains, self.d.queues[q].gq.size),
        );
        assert!(
            used.iter().all(|u| u.1 == 0),
            "TX chain returned with a length: {used:?}"
        );
        assert!(
            subsequence(&got, &expected),
            "backend got frames that were not sent"
        );
        assert!(
            expected.is_empty() || !got.is_empty(),
            "no frame reached the backend"
        );
        let after =
            [&c.tx_frames, &c.tx_errors, &c.tx_malformed].map(|a| a.load(Ordering::Relaxed));
        assert_eq!(after[0] - before[0], got.len() as u64, "tx_frames");
        assert_eq!(
            after[1] - before[1],
            (expected.len() - got.len()) as u64,
            "tx_errors"
        );
        assert_eq!(
            after[2] - before[2],
            (chains.len() - expected.len()) as u64,
            "tx_malformed"
        );
        let allowed = [self.d.queues[q].used_ring_range()];
        drop(chains);
        if let Some(gpa) = snap.unwrap().changed_outside(self.d.mem, &allowed) {
            panic!("TX changed guest memory at {gpa:#x}");
        }
    }

    /// Frames go to the peer; those the device will deliver join the FIFO.
    /// False if the socket is full.
    fn send(&mut self, f: &[u8]) -> bool {
        let ok = self.peer.write(f).is_ok();
        if ok && f.len() >= VNET_HDR_LEN {
            self.fifo.push_back(f.to_vec());
        }
        ok
    }

    fn rx(&mut self, batch: &Batch<RawBytes>, frames: &[Frame], by_event: bool) {
        let mut b = batch.clone();
        b.queue = RX as u8;
        let (q, sub) = self.d.submit(&b);
        let size = self.d.queues[q].gq.size;
        let used_before = self.d.queues[q].gq.used_idx();
        for f in frames.iter().take(64) {
            if !self.send(&f.bytes()) {
                break;
            }
        }
        // Enough frames that every buffer posted is consumed: the next
        // round may then reuse the descriptor table.
        let n_chains = match &sub {
            Submitted::Chains(c) => c.len(),
            Submitted::Corrupt => 1,
        };
        while self.fifo.len() < n_chains {
            let mut f = vec![0u8; 64];
            f[VNET_HDR_LEN..VNET_HDR_LEN + 8].copy_from_slice(&self.filler.to_le_bytes());
            self.filler += 1;
            if !self.send(&f) {
                break;
            }
        }
        let c = self.counters.clone();
        let before = [&c.rx_frames, &c.rx_bad_chains].map(|a| a.load(Ordering::Relaxed));
        let snap = (!self.d.chaos).then(|| Snapshot::take(self.d.mem));
        let kick = |d: &mut Driver<'_>| {
            if by_event {
                d.h.transport.handle_event(0);
            } else {
                d.h.kick(RX);
            }
        };
        kick(&mut self.d);
        if self.d.chaos {
            if !self.d.is_active() {
                self.reset();
            }
            return;
        }
        let chains = match sub {
            Submitted::Corrupt => {
                // The device looks at the ring only when it has a frame.
                assert!(
                    !self.d.is_active() && self.d.needs_reset(),
                    "corrupt RX ring: still active"
                );
                self.reset();
                return;
            }
            Submitted::Chains(c) => c,
        };
        assert!(self.d.is_active(), "device stopped without a corrupt ring");
        // The model: each chain meets the oldest waiting frame.
        let mem = self.d.mem;
        let mut expected = Vec::new();
        let mut delivered = Vec::new();
        let mut bad = 0u64;
        // The device takes a buffer only when it has a frame for it.
        let mut consumed = 0;
        for w in &chains {
            let Some(frame) = self.fifo.front() else {
                break;
            };
            consumed += 1;
            let writer = if w.info.descs.iter().any(|d| !d.2) {
                None
            } else {
                w.chain
                    .clone()
                    .writer(mem)
                    .ok()
                    .filter(|w| w.available_bytes() >= VNET_HDR_LEN)
            };
            let len = match writer {
                Some(wr) if wr.available_bytes() >= frame.len() => {
                    let mut f = self.fifo.pop_front().unwrap();
                    f[10..12].copy_from_slice(&1u16.to_le_bytes());
                    delivered.push((w, f));
                    delivered.last().unwrap().1.len() as u32
                }
                Some(_) => {
                    self.fifo.pop_front();
                    0
                }
                None => {
                    bad += 1;
                    0
                }
            };
            if w.info.head < size {
                expected.push((w.info.head, len));
            }
        }
        let bounds: Vec<(u16, Option<u64>)> = expected
            .iter()
            .map(|&(h, _)| {
                (
                    h,
                    chains
                        .iter()
                        .find(|w| w.info.head == h)
                        .map(|w| w.info.writable_bytes),
                )
            })
            .collect();
        let used = self.d.check_used(q, used_before, &bounds);
        let lens: Vec<u32> = used.iter().map(|u| u.1).collect();
        let want: Vec<u32> = expected.iter().map(|e| e.1).collect();
        assert_eq!(lens, want, "RX used lengths differ from the model");
        let after = [&c.rx_frames, &c.rx_bad_chains].map(|a| a.load(Ordering::Relaxed));
        assert_eq!(after[0] - before[0], delivered.len() as u64, "rx_frames");
        assert_eq!(after[1] - before[1], bad, "rx_bad_chains");
        // Delivered bytes, where no other buffer of the round overlaps.
        let ranges: Vec<(u64, u64)> = chains.iter().flat_map(|w| w.info.writable()).collect();
        for (w, f) in &delivered {
            let mine: Vec<(u64, u64)> = w.info.writable().collect();
            let shared = mine.iter().any(|&(a, l)| {
                ranges
                    .iter()
                    .filter(|&&(b, m)| overlaps(a, l, b, m))
                    .count()
                    > 1
            });
            if shared {
                continue;
            }
            let mut got = Vec::with_capacity(f.len());
            for (a, l) in mine {
                let n = (l as usize).min(f.len() - got.len());
                let mut part = vec![0u8; n];
                mem.read_slice(&mut part, GuestAddress(a)).unwrap();
                got.extend_from_slice(&part);
            }
            assert_eq!(&got, f, "delivered frame differs");
        }
        let allowed = self.d.allowed(q, &chains);
        let left_over = consumed < chains.len();
        drop(delivered);
        drop(chains);
        if let Some(gpa) = snap.unwrap().changed_outside(mem, &allowed) {
            panic!("RX changed guest memory at {gpa:#x} outside its buffers");
        }
        // Buffers still posted would be overwritten by the next round's
        // descriptors: start over.
        if left_over {
            self.reset();
        }
    }

    /// One frame out and one in, through two-descriptor chains.
    fn well_formed(&mut self, round: u8) {
        let out: Vec<u8> = (0..72u8).map(|i| i ^ round).collect();
        let at = DATA0 + 0x3_0000;
        self.d.mem.write_slice(&out, GuestAddress(at)).unwrap();
        let tx = Batch {
            queue: TX as u8,
            writes: vec![],
            chains: vec![ChainSpec::Direct(vec![
                DescSpec {
                    addr: Addr::Data0(0x3_0000),
                    len: Len::Word(20),
                    write: false,
                    content: None,
                },
                DescSpec {
                    addr: Addr::Data0(0x3_0014),
                    len: Len::Word(52),
                    write: false,
                    content: None,
                },
            ])],
            avail_skew: None,
        };
        drain(&mut self.peer);
        let sent_before = self.counters.tx_frames.load(Ordering::Relaxed);
        // tx() checks that the peer got exactly these 72 bytes.
        self.tx(&tx);
        assert_eq!(
            self.counters.tx_frames.load(Ordering::Relaxed),
            sent_before + 1
        );

        // One buffer per round (a queue may hold only two descriptors):
        // the first may meet the frame the device holds, then the marker.
        let rx = Batch {
            queue: RX as u8,
            writes: vec![],
            chains: vec![ChainSpec::Direct(vec![
                DescSpec {
                    addr: Addr::Data1(0x3_1000),
                    len: Len::Word(12),
                    write: true,
                    content: None,
                },
                DescSpec {
                    addr: Addr::Data1(0x3_2000),
                    len: Len::Word(4096),
                    write: true,
                    content: None,
                },
            ])],
            avail_skew: None,
        };
        // Only the frame the device may hold stays ahead of the marker.
        drain(&mut self.ours);
        self.fifo.truncate(1);
        let frames_before = self.counters.rx_frames.load(Ordering::Relaxed);
        self.rx(&rx, &[Frame::Sized(100, round)], round.is_multiple_of(2));
        if !self.fifo.is_empty() {
            self.rx(&rx, &[], round % 2 == 1);
        }
        assert!(self.d.is_active());
        assert!(self.fifo.is_empty(), "marker frame not taken");
        assert!(
            self.counters.rx_frames.load(Ordering::Relaxed) > frames_before,
            "no frame delivered to well-formed buffers"
        );
    }
}

fuzz_target!(|input: Input| {
    let (ours, peer) = socketpair();
    let ours_dup = ours.try_clone().unwrap();
    let backend = SockBackend {
        file: ours,
        offloads: Arc::new(Mutex::new(Vec::new())),
    };
    let net = Net::with_backend(Box::new(backend), MacAddr([2, 0, 0, 0, 0, 1]), NetPolicy::OPEN).expect("net");
    let counters = net.counters();
    let mem = guest_memory();
    let h = Harness::with_mem(net, mem.clone());
    let sizes = [
        queue_size(input.rx_size, 256),
        queue_size(input.tx_size, 256),
    ];
    let mut d = Driver::new(h, &mem, input.features, &sizes, input.chaos);
    d.readable_outside_rings = true;
    let mut n = Net2 {
        d,
        peer,
        ours: ours_dup,
        counters,
        fifo: VecDeque::new(),
        filler: 0,
    };
    for op in input.ops.iter().take(16) {
        match op {
            Op::Tx(b) => n.tx(b),
            Op::Rx {
                buffers,
                frames,
                by_event,
            } => n.rx(buffers, frames, *by_event),
        }
    }
    if n.d.chaos || !n.d.is_active() {
        n.reset();
        n.d.chaos = false;
    } else {
        n.well_formed(1);
    }
    n.reset();
    n.well_formed(2);
});
