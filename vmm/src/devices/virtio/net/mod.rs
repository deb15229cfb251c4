//! virtio-net on a TAP device: one RX and one TX queue, frames passed
//! through with their `virtio_net_hdr_v1` untouched (so checksum and
//! segmentation offloads cost nothing here).
//!
//! Each direction has a rate limiter (bytes and frames per second, `bw=`
//! and `pps=`), and TX frames whose source MAC is not the guest's are
//! dropped and counted (`mac-filter=`), so that a guest cannot flood the
//! host's network or speak for its neighbours.
//!
//! RX is driven by two events: the TAP fd became readable (edge-triggered),
//! or the guest added receive buffers. A frame read from the TAP device with
//! no guest buffer to put it in is kept until the guest adds one; the loop
//! then waits for the guest's notification instead of polling, so a guest
//! that stops receiving costs no host CPU.

pub mod backend;
pub mod tap;

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC,
};
use vm_memory::GuestMemoryMmap;

pub use backend::NetBackend;
pub use tap::{Tap, TapError};

use super::device::{read_config_bytes, ActivateError, EventSource, VirtioDevice};
use super::limiter::{ms, Limits, RateLimiter};
use super::queue::{drain_limited, Chain, QueueCtx, CHAIN_BUDGET};
use super::COMMON_FEATURES;
use crate::config::devices::{MacAddr, NetConfig};

/// `struct virtio_net_hdr_v1`, which VERSION_1 makes the only header size.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame after the header: a 64 KiB GSO packet plus an Ethernet
/// header with one VLAN tag.
pub const MAX_FRAME_LEN: usize = 65536 + 18;
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames dropped because the guest's buffer was too small, or runts.
    pub rx_dropped: AtomicU64,
    /// RX chains with no usable writable buffer, returned empty.
    pub rx_bad_chains: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// TX chains dropped as malformed: too short, too long, writable
    /// buffers, or buffers outside guest memory.
    pub tx_malformed: AtomicU64,
    /// Frames the backend refused.
    pub tx_errors: AtomicU64,
    /// Frames dropped because their source MAC was not the guest's.
    pub tx_spoofed: AtomicU64,
}

/// What a NIC may do, from its `--net` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetPolicy {
    /// Each direction's limits.
    pub limits: Limits,
    /// Drop TX frames from other source MACs.
    pub filter_source_mac: bool,
}

impl NetPolicy {
    /// No limits, no filter (tests and benchmarks of the data path).
    pub const OPEN: NetPolicy = NetPolicy {
        limits: Limits::UNLIMITED,
        filter_source_mac: false,
    };

    pub fn of(cfg: &NetConfig) -> Self {
        Self {
            limits: Limits {
                bytes_per_s: cfg.bytes_per_s(),
                ops_per_s: cfg.frames_per_s(),
            },
            filter_source_mac: cfg.filters_source_mac(),
        }
    }
}

/// The device's event sources besides its queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Backend,
    RxTimer,
    TxTimer,
}

pub struct Net {
    backend: Box<dyn NetBackend>,
    config: [u8; 6],
    acked_features: u64,
    /// A frame read from the backend and not yet delivered: its length in
    /// `rx_buf`.
    rx_pending: Option<usize>,
    rx_buf: Box<[u8]>,
    tx_buf: Box<[u8]>,
    counters: Arc<NetCounters>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    filter_source_mac: bool,
}

// By hand: the backend is a trait object, the buffers 64 KiB of bytes.
impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("backend_fd", &self.backend.raw_fd())
            .field("mac", &self.config)
            .field("acked_features", &self.acked_features)
            .field("rx_pending", &self.rx_pending)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// Attaches to the TAP device named in `cfg`.
    pub fn new(cfg: &NetConfig) -> Result<Self, TapError> {
        let tap = Tap::open(&cfg.tap)?;
        Self::with_backend(Box::new(tap), cfg.mac_or_default(), NetPolicy::of(cfg))
            .map_err(TapError::Timer)
    }

    pub fn with_backend(
        backend: Box<dyn NetBackend>,
        mac: MacAddr,
        policy: NetPolicy,
    ) -> io::Result<Self> {
        Ok(Self {
            backend,
            config: mac.0,
            acked_features: 0,
            rx_pending: None,
            rx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN].into_boxed_slice(),
            tx_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN].into_boxed_slice(),
            counters: Arc::default(),
            rx_limiter: RateLimiter::new(policy.limits)?,
            tx_limiter: RateLimiter::new(policy.limits)?,
            filter_source_mac: policy.filter_source_mac,
        })
    }

    /// The event sources in the order `event_sources` gives them.
    fn sources(&self) -> Vec<(Source, EventSource)> {
        let timer = |fd| EventSource {
            fd,
            edge_triggered: false,
        };
        let mut v = vec![(
            Source::Backend,
            EventSource {
                fd: self.backend.raw_fd(),
                edge_triggered: true,
            },
        )];
        if let Some(fd) = self.rx_limiter.timer_fd() {
            v.push((Source::RxTimer, timer(fd)));
        }
        if let Some(fd) = self.tx_limiter.timer_fd() {
            v.push((Source::TxTimer, timer(fd)));
        }
        v
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Which TUN_F_* offloads the guest's acked GUEST_* features allow the
    /// TAP device to hand us.
    fn tun_offloads(acked: u64) -> u32 {
        let has = |f: u32| acked & (1 << f) != 0;
        let mut flags = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= libc::TUN_F_CSUM;
            // The kernel ignores segmentation offloads without checksum offload.
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= libc::TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= libc::TUN_F_TSO6;
            }
            if has(VIRTIO_NET_F_GUEST_UFO) {
                flags |= libc::TUN_F_UFO;
            }
        }
        flags
    }

    /// Reads the next frame from the backend into `rx_buf`, unless one is
    /// pending already. False when the backend has nothing.
    fn fill_rx(&mut self) -> bool {
        if self.rx_pending.is_some() {
            return true;
        }
        loop {
            match self.backend.read_frame(&mut self.rx_buf) {
                Ok(n) if n >= VNET_HDR_LEN => {
                    // num_buffers: the TAP device leaves it alone; without
                    // MRG_RXBUF it must be 1.
                    self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                    self.rx_pending = Some(n);
                    return true;
                }
                Ok(_) => {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    warn_ratelimited!("virtio-net: reading from the backend failed: {e}");
                    return false;
                }
            }
        }
    }

    /// Moves frames from the backend into the guest's receive buffers until
    /// either runs out (or the budget does).
    fn process_rx(&mut self, ctx: &mut QueueCtx<'_>) {
        let mut used = false;
        let mut steps = 0;
        let mem = ctx.mem();
        while self.fill_rx() {
            steps += 1;
            if steps > CHAIN_BUDGET {
                ctx.requeue(RX);
                break;
            }
            // Throttled: the frame waits (in rx_buf and the TAP's queue,
            // where the kernel drops what overflows) until the timer.
            if !self.rx_limiter.admit() {
                break;
            }
            let Some(len) = self.rx_pending else { break };
            let chain = match ctx.pop(RX) {
                Ok(Some(c)) => c,
                Ok(None) => match ctx.enable_notification(RX) {
                    // Buffers arrived while notifications were off.
                    Ok(true) => continue,
                    // Keep the frame; the guest's next notification resumes us.
                    _ => break,
                },
                Err(_) => break,
            };
            let head = chain.head_index();
            // RX chains hold only writable buffers; anything else is
            // returned empty and the frame waits for the next chain.
            let writer = if chain.clone().readable().next().is_some() {
                None
            } else {
                chain
                    .writer(mem)
                    .ok()
                    .filter(|w| w.available_bytes() >= VNET_HDR_LEN)
            };
            used = true;
            match writer {
                Some(mut w) if w.available_bytes() >= len => {
                    // Checked above: the writer has room for all of it.
                    let _ = w.write_all(&self.rx_buf[..len]);
                    // len <= rx_buf.len(): a header and one frame, about 64 KiB.
                    ctx.add_used(RX, head, u32::try_from(len).unwrap_or(u32::MAX));
                    self.rx_limiter.charge((len - VNET_HDR_LEN) as u64);
                    self.rx_pending = None;
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .rx_bytes
                        .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                }
                Some(w) => {
                    // Too small for this frame. Dropping the frame and
                    // returning the buffer empty (Linux counts a length
                    // error and recycles it) always makes progress: keeping
                    // either would let one small buffer or one large frame
                    // stall the queue.
                    warn_ratelimited!(
                        "virtio-net: dropping a {len}-byte frame: guest buffer holds {}",
                        w.available_bytes()
                    );
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    self.rx_pending = None;
                    ctx.add_used(RX, head, 0);
                }
                None => {
                    self.counters.rx_bad_chains.fetch_add(1, Ordering::Relaxed);
                    ctx.add_used(RX, head, 0);
                }
            }
        }
        if used {
            ctx.notify(RX);
        }
    }

    /// True when `frame` (Ethernet, after the virtio header) carries the
    /// guest's own MAC as its source.
    fn sent_from_guest_mac(&self, frame: &[u8]) -> bool {
        frame.get(6..12) == Some(&self.config[..])
    }

    /// Sends one TX chain; returns 0 (the device writes nothing into it).
    fn transmit(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let malformed = |c: &NetCounters| {
            c.tx_malformed.fetch_add(1, Ordering::Relaxed);
            0
        };
        if chain.clone().writable().next().is_some() {
            return malformed(&self.counters);
        }
        let Ok(mut reader) = chain.reader(mem) else {
            return malformed(&self.counters);
        };
        let len = reader.available_bytes();
        if !(VNET_HDR_LEN..=self.tx_buf.len()).contains(&len) {
            warn_ratelimited!("virtio-net: dropping a {len}-byte TX chain");
            return malformed(&self.counters);
        }
        if reader.read_exact(&mut self.tx_buf[..len]).is_err() {
            return malformed(&self.counters);
        }
        if self.filter_source_mac && !self.sent_from_guest_mac(&self.tx_buf[VNET_HDR_LEN..len]) {
            self.counters.tx_spoofed.fetch_add(1, Ordering::Relaxed);
            warn_ratelimited!(
                "virtio-net: dropping a TX frame whose source MAC is not the guest's"
            );
            return 0;
        }
        match self.backend.write_frame(&self.tx_buf[..len]) {
            Ok(_) => {
                self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .tx_bytes
                    .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
            }
            Err(e) => {
                // The kernel validates the header (a bad GSO type, say) and
                // refuses the frame; the guest sees a dropped packet.
                warn_ratelimited!("virtio-net: backend refused a {len}-byte frame: {e}");
                self.counters.tx_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        0
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_UFO
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_HOST_UFO
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), ActivateError> {
        self.backend
            .set_offload(Self::tun_offloads(acked_features))
            .map_err(ActivateError::Backend)?;
        self.acked_features = acked_features;
        Ok(())
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        self.rx_pending = None;
        if let Err(e) = self.backend.set_offload(0) {
            warn_ratelimited!("virtio-net: cannot reset offloads: {e}");
        }
    }

    fn queue_notify(&mut self, index: usize, ctx: &mut QueueCtx<'_>) {
        match index {
            RX => self.process_rx(ctx),
            TX => {
                let mut limiter = std::mem::take(&mut self.tx_limiter);
                drain_limited(ctx, TX, &mut limiter, |mem, chain| {
                    let len = chain_len(&chain);
                    (self.transmit(mem, chain), len)
                });
                self.tx_limiter = limiter;
            }
            _ => {}
        }
    }

    fn event_sources(&self) -> Vec<EventSource> {
        self.sources().into_iter().map(|(_, s)| s).collect()
    }

    fn handle_event(&mut self, source: usize, ctx: Option<&mut QueueCtx<'_>>) {
        let which = self.sources().get(source).map(|(w, _)| *w);
        match which {
            Some(Source::RxTimer) => self.rx_limiter.on_timer(),
            Some(Source::TxTimer) => self.tx_limiter.on_timer(),
            Some(Source::Backend) | None => {}
        }
        // While inactive the frames wait in the backend; activation kicks RX.
        let Some(ctx) = ctx else { return };
        match which {
            Some(Source::TxTimer) => self.queue_notify(TX, ctx),
            _ => self.process_rx(ctx),
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("rx_frames", get(&c.rx_frames)),
            ("rx_bytes", get(&c.rx_bytes)),
            ("rx_dropped", get(&c.rx_dropped)),
            ("rx_bad_chains", get(&c.rx_bad_chains)),
            ("tx_frames", get(&c.tx_frames)),
            ("tx_bytes", get(&c.tx_bytes)),
            ("tx_malformed", get(&c.tx_malformed)),
            ("tx_errors", get(&c.tx_errors)),
            ("tx_spoofed", get(&c.tx_spoofed)),
            ("rx_throttled_ms", ms(&self.rx_limiter.throttled_ns())),
            ("tx_throttled_ms", ms(&self.tx_limiter.throttled_ns())),
        ]
    }
}

/// The bytes a TX chain carries (what its rate limiter is charged).
fn chain_len(chain: &Chain<'_>) -> u64 {
    chain
        .clone()
        .readable()
        .map(|d| u64::from(d.len()))
        .sum::<u64>()
        .saturating_sub(VNET_HDR_LEN as u64)
}

#[cfg(test)]
mod tap_tests;
#[cfg(test)]
mod tests;
