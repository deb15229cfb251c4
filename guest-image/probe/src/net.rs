//! virtio-net (5.1): receiveq1 and transmitq1 only, no offloads, 2 KiB
//! buffers of one descriptor each (the 12-byte `virtio_net_hdr_v1`, then the
//! frame). Descriptor `d` of a queue always uses buffer `d`.

use crate::time::rdtsc;
use crate::virtio::{self, Arena, Error, Mmio, Virtq};
use probe_pattern::{fill_words, DOMAIN_NET};

const F_MAC: u64 = 1 << 5;
const CFG_MAC: usize = 0;

const RX_QUEUE: u16 = 32;
const TX_QUEUE: u16 = 16;
const BUF: u64 = 2048;
/// `struct virtio_net_hdr_v1` (with num_buffers: always with VERSION_1).
const HDR: usize = 12;
/// Smallest frame `net-send` makes: Ethernet header and sequence number.
pub const FRAME_MIN: u64 = 14 + 8;
/// Largest frame (no FCS, no VLAN tag).
pub const FRAME_MAX: u64 = 1514;
/// The EtherType of `net-send` frames (IEEE local experimental 1).
const ETHERTYPE: u16 = 0x88b5;
/// Most received frames handled per `poll`, so that the serial input gets
/// its turn under a flood.
const POLL_BUDGET: u32 = 256;
/// Seconds an echo waits for a free transmit buffer before it is dropped.
const ECHO_WAIT_S: u64 = 1;
/// Seconds to wait for the device to take transmit buffers.
const TIMEOUT_S: u64 = 5;

pub struct Net {
    pub mmio: Mmio,
    rx: Virtq,
    tx: Virtq,
    rx_bufs: u64,
    tx_bufs: u64,
    pub mac: [u8; 6],
    pub echo: bool,
    /// Frames and frame bytes (without the virtio header) received.
    pub rx_frames: u64,
    pub rx_bytes: u64,
}

impl Net {
    /// `seq` numbers the device among the net devices (for a made-up MAC
    /// when the device has none).
    pub fn init(mmio: Mmio, arena: &mut Arena, seq: u8) -> Result<Net, (Mmio, Error)> {
        match Self::try_init(&mmio, arena) {
            Ok((features, rx, tx, rx_bufs, tx_bufs)) => {
                let mut mac = [0x02, 0x6b, 0x73, 0x6d, 0x00, seq]; // "ksm", local
                if features & F_MAC != 0 {
                    for (i, b) in mac.iter_mut().enumerate() {
                        *b = mmio.config_u8(CFG_MAC + i);
                    }
                }
                let mut net = Net {
                    mmio,
                    rx,
                    tx,
                    rx_bufs,
                    tx_bufs,
                    mac,
                    echo: false,
                    rx_frames: 0,
                    rx_bytes: 0,
                };
                while net.post_rx() {}
                net.rx.kick();
                Ok(net)
            }
            Err(e) => Err((mmio, e)),
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_init(mmio: &Mmio, arena: &mut Arena) -> Result<(u64, Virtq, Virtq, u64, u64), Error> {
        let features = mmio.begin_init(F_MAC)?;
        let rx = mmio.setup_queue(0, RX_QUEUE, arena)?;
        let tx = mmio.setup_queue(1, TX_QUEUE, arena)?;
        let rx_bufs = arena.alloc(u64::from(rx.size) * BUF)?;
        let tx_bufs = arena.alloc(u64::from(tx.size) * BUF)?;
        mmio.driver_ok();
        Ok((features, rx, tx, rx_bufs, tx_bufs))
    }

    /// Gives the device one more receive buffer (no notification); false
    /// when all are posted.
    fn post_rx(&mut self) -> bool {
        let Some(d) = self.rx.next_free() else {
            return false;
        };
        let buf = self.rx_bufs + u64::from(d) * BUF;
        self.rx.push(&[(buf, BUF as u32, true)]).is_some()
    }

    /// Takes back the transmit buffers the device is done with.
    fn reclaim_tx(&mut self) {
        while self.tx.pop_used().is_some() {}
    }

    /// The free transmit buffer, if any: (descriptor, its buffer).
    fn tx_slot(&mut self) -> Option<(u16, &'static mut [u8])> {
        let d = self.tx.next_free()?;
        let buf = self.tx_bufs + u64::from(d) * BUF;
        // SAFETY: transmit buffer `d` belongs to the free descriptor `d`,
        // so the device is not reading it; arena RAM owned by this device.
        Some((d, unsafe {
            core::slice::from_raw_parts_mut(buf as *mut u8, BUF as usize)
        }))
    }

    /// Queues the frame in transmit buffer `d` (its first `len` bytes after
    /// the header), without notifying.
    fn push_tx(&mut self, d: u16, len: usize) {
        let buf = self.tx_bufs + u64::from(d) * BUF;
        let pushed = self.tx.push(&[(buf, (HDR + len) as u32, false)]);
        debug_assert_eq!(pushed, Some(d));
    }

    /// Handles received frames (counts them; echoes them when echo is on),
    /// reposts their buffers and takes back finished transmit buffers.
    /// Returns true if it stopped with frames still waiting.
    pub fn poll(&mut self) -> bool {
        self.reclaim_tx();
        let (mut rx_n, mut tx_n) = (0u32, 0u32);
        while rx_n < POLL_BUDGET {
            let Some((head, len)) = self.rx.pop_used() else {
                break;
            };
            rx_n += 1;
            let len = (len as usize).min(BUF as usize);
            let frame_len = len.saturating_sub(HDR);
            self.rx_frames += 1;
            self.rx_bytes += frame_len as u64;
            if self.echo && frame_len >= 14 {
                if self.tx.num_free() == 0 {
                    self.reclaim_tx();
                }
                if self.tx.num_free() == 0 {
                    // Ring full of echoes not yet notified: hand them over
                    // and wait (briefly) for the device to take some.
                    self.tx.kick();
                    tx_n = 0;
                    let (tx, mmio) = (&self.tx, &self.mmio);
                    // On timeout the echo is dropped (below).
                    let _ = virtio::wait(mmio, ECHO_WAIT_S, || tx.has_used());
                    self.reclaim_tx();
                }
                let src = self.rx_bufs + u64::from(head) * BUF;
                // SAFETY: the device has used receive buffer `head` and
                // does not write it until it is posted again below.
                let rx = unsafe { core::slice::from_raw_parts(src as *const u8, len) };
                if let Some((d, tx)) = self.tx_slot() {
                    tx[..HDR].fill(0);
                    tx[HDR..len].copy_from_slice(&rx[HDR..]);
                    // Swap destination and source MAC.
                    for i in 0..6 {
                        tx.swap(HDR + i, HDR + 6 + i);
                    }
                    self.push_tx(d, frame_len);
                    tx_n += 1;
                }
                // else: no transmit buffer free: the echo is dropped.
            }
            self.post_rx();
        }
        if rx_n > 0 {
            self.rx.kick();
        }
        if tx_n > 0 {
            self.tx.kick();
        }
        self.rx.has_used()
    }

    /// Sends `count` frames of `size` bytes (broadcast destination, our MAC,
    /// EtherType 0x88b5, payload: the sequence number 0.. as u64 LE, then
    /// words 0.. of page `seq` of `DOMAIN_NET` (seed 0) as LE bytes).
    /// Returns frames sent and TSC cycles from the first frame queued to the
    /// last one used by the device.
    pub fn send(&mut self, count: u64, size: u64) -> Result<(u64, u64), Error> {
        self.send_from(count, size, false, TIMEOUT_S)
    }

    /// Like `send`; with `forge` each frame's source MAC is a made-up one,
    /// `forged_mac(seq)`, instead of ours. `timeout_s`: how long to wait for
    /// the device to take a transmit buffer (a rate-limited device is slow).
    pub fn send_from(
        &mut self,
        count: u64,
        size: u64,
        forge: bool,
        timeout_s: u64,
    ) -> Result<(u64, u64), Error> {
        let size = size as usize;
        let start = rdtsc();
        let mut words = [0u64; (FRAME_MAX as usize).div_ceil(8)];
        let pattern_words = (size - FRAME_MIN as usize).div_ceil(8);
        for seq in 0..count {
            let (d, buf) = loop {
                self.reclaim_tx();
                if let Some(slot) = self.tx_slot() {
                    break slot;
                }
                self.tx.kick();
                let (tx, mmio) = (&self.tx, &self.mmio);
                virtio::wait(mmio, timeout_s, || tx.has_used())?;
            };
            buf[..HDR].fill(0);
            let f = &mut buf[HDR..HDR + size];
            f[..6].fill(0xff);
            let src = if forge {
                forged_mac(seq, &self.mac)
            } else {
                self.mac
            };
            f[6..12].copy_from_slice(&src);
            f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
            f[14..22].copy_from_slice(&seq.to_le_bytes());
            fill_words(DOMAIN_NET, 0, seq, 0, &mut words[..pattern_words]);
            for (chunk, w) in f[22..].chunks_mut(8).zip(&words) {
                chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]);
            }
            self.push_tx(d, size);
            // Notify in batches: when the ring is full (and at the end).
            if self.tx.num_free() == 0 {
                self.tx.kick();
            }
        }
        self.tx.kick();
        let (tx, mmio) = (&mut self.tx, &self.mmio);
        virtio::wait(mmio, timeout_s, || {
            while tx.pop_used().is_some() {}
            tx.num_free() == tx.size
        })?;
        Ok((count, rdtsc().wrapping_sub(start)))
    }
}

/// The source MAC of forged frame `seq`: 02:66:6f (locally administered
/// unicast, "fo") and the low 24 bits of `seq`, a new address for every
/// frame (what fills a bridge's forwarding table); never `own`.
pub fn forged_mac(seq: u64, own: &[u8; 6]) -> [u8; 6] {
    let s = seq.to_be_bytes();
    let mut mac = [0x02, 0x66, 0x6f, s[5], s[6], s[7]];
    if mac == *own {
        mac[1] ^= 0x80;
    }
    mac
}
