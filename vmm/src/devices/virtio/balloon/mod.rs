//! virtio-balloon: the host asks the guest to give memory back, and the
//! guest reports memory it does not use.
//!
//! Queues, in the order the driver numbers them (an absent optional queue
//! does not take a number, as in Linux and virtio 1.2, 5.5.2):
//! inflate (PFNs the guest gives up: their host pages are dropped), deflate
//! (PFNs it takes back: nothing to do, they fault in as zero pages), stats
//! (VIRTIO_BALLOON_F_STATS_VQ) and free page reporting
//! (VIRTIO_BALLOON_F_REPORTING: free ranges whose host pages are dropped).
//! With reporting the device also offers VIRTIO_BALLOON_F_PAGE_POISON:
//! Linux turns reporting off when it initialises freed pages
//! (`init_on_free=1`, page poisoning) and the device cannot say what
//! dropped pages read back as. Dropped pages read back as zero, so ranges
//! are dropped only while the driver's `poison_val` is 0.
//!
//! The API thread talks to the device through a [`BalloonHandle`] (which
//! it gets from the device, found by id in the running VM): it sets
//! the target (`num_pages` in config space) and reads `actual` and the
//! latest statistics. A target change wakes the event loop, which raises
//! the configuration-change interrupt.

mod discard;
mod stats;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

pub use discard::{discard, DiscardError};
pub use stats::BalloonStats;

use super::device::{ActivateError, EventSource, VirtioDevice};
use super::queue::{drain, Chain, QueueBroken, QueueCtx, CHAIN_BUDGET};
use super::{COMMON_FEATURES, PAGE_SIZE};
use crate::config::devices::BalloonConfig;

// virtio-bindings has no balloon header; virtio 1.2, 5.5.3.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

pub const QUEUE_SIZE: u16 = 128;
/// PFNs read from one inflate or deflate chain. Linux sends at most 256;
/// the cap bounds the work one (looping, 4 GiB) chain can cause.
pub const MAX_PFNS_PER_CHAIN: usize = 64 * 1024;
const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;

const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const EVT_TARGET: usize = 0;
const EVT_STATS_TIMER: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("balloon target of {mib} MiB exceeds guest RAM of {ram_mib} MiB")]
    TargetTooLarge { mib: u64, ram_mib: u64 },
    #[error("cannot create balloon event: {0}")]
    Event(#[source] std::io::Error),
}

#[derive(Debug, Default)]
pub struct BalloonCounters {
    pub inflated_pages: AtomicU64,
    pub deflated_pages: AtomicU64,
    /// PFNs or reported ranges outside guest RAM, ignored.
    pub invalid_pfns: AtomicU64,
    pub reported_bytes: AtomicU64,
    pub invalid_reports: AtomicU64,
    /// Reported bytes kept because the driver's poison value is not 0
    /// (dropping them would hand the guest zeroes where it expects it).
    pub poisoned_report_bytes: AtomicU64,
    pub stats_updates: AtomicU64,
}

/// State the device shares with its handle.
struct Shared {
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    stats: Mutex<Option<BalloonStats>>,
    target_evt: EventFd,
    ram_mib: u64,
    counters: BalloonCounters,
}

/// The API thread's view of the balloon.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandle")
            .field("target_mib", &self.target_mib())
            .field("actual_mib", &self.actual_mib())
            .finish()
    }
}

impl BalloonHandle {
    /// Asks the guest to give up `mib` MiB (0 deflates the balloon fully).
    pub fn set_target_mib(&self, mib: u64) -> Result<(), BalloonError> {
        let ram_mib = self.shared.ram_mib;
        if mib > ram_mib {
            return Err(BalloonError::TargetTooLarge { mib, ram_mib });
        }
        // ram_mib fits: guest RAM is far below 2^32 pages of 4 KiB (16 TiB).
        let pages = u32::try_from(mib * PAGES_PER_MIB).unwrap_or(u32::MAX);
        self.shared.target_pages.store(pages, Ordering::Release);
        self.shared.target_evt.write(1).map_err(BalloonError::Event)
    }

    pub fn target_mib(&self) -> u64 {
        u64::from(self.shared.target_pages.load(Ordering::Acquire)) / PAGES_PER_MIB
    }

    /// What the guest says it has given up, in MiB (rounded down).
    pub fn actual_mib(&self) -> u64 {
        u64::from(self.actual_pages()) / PAGES_PER_MIB
    }

    pub fn actual_pages(&self) -> u32 {
        self.shared.actual_pages.load(Ordering::Acquire)
    }

    /// The latest statistics, if the guest has sent any.
    pub fn stats(&self) -> Option<BalloonStats> {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn counters(&self) -> &BalloonCounters {
        &self.shared.counters
    }
}

/// The queues the driver set up, by role, once features are known.
#[derive(Debug, Default, Clone, Copy)]
struct Layout {
    stats: Option<usize>,
    reporting: Option<usize>,
}

impl Layout {
    fn for_features(acked: u64) -> Layout {
        let mut next = DEFLATE + 1;
        let mut take = |bit: u32| {
            (acked & (1 << bit) != 0).then(|| {
                next += 1;
                next - 1
            })
        };
        let stats = take(VIRTIO_BALLOON_F_STATS_VQ);
        let reporting = take(VIRTIO_BALLOON_F_REPORTING);
        Layout { stats, reporting }
    }
}

pub struct Balloon {
    shared: Arc<Shared>,
    features: u64,
    queue_sizes: Vec<u16>,
    stats_interval: Option<Duration>,
    timer: TimerFd,
    layout: Layout,
    /// The stats buffer the device holds until it wants fresh numbers.
    stats_head: Option<u16>,
    /// What the driver fills freed pages with (config space, PAGE_POISON).
    poison_val: u32,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("features", &format_args!("{:#x}", self.features))
            .field("layout", &self.layout)
            .field("poison_val", &self.poison_val)
            .finish_non_exhaustive()
    }
}

impl Balloon {
    pub fn new(
        cfg: &BalloonConfig,
        mem: &GuestMemoryMmap,
    ) -> Result<(Balloon, BalloonHandle), BalloonError> {
        let ram_bytes: u64 = mem.iter().map(|r| r.len()).sum();
        let shared = Arc::new(Shared {
            target_pages: AtomicU32::new(0),
            actual_pages: AtomicU32::new(0),
            stats: Mutex::new(None),
            target_evt: EventFd::new(EFD_NONBLOCK).map_err(BalloonError::Event)?,
            ram_mib: ram_bytes >> 20,
            counters: BalloonCounters::default(),
        });
        let timer = TimerFd::new().map_err(|e| BalloonError::Event(e.into()))?;
        set_nonblocking(&timer).map_err(BalloonError::Event)?;
        let mut features = COMMON_FEATURES;
        let mut queue_sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        let stats_interval = (cfg.stats_interval_s > 0)
            .then(|| Duration::from_secs(u64::from(cfg.stats_interval_s)));
        if stats_interval.is_some() {
            features |= 1 << VIRTIO_BALLOON_F_STATS_VQ;
            queue_sizes.push(QUEUE_SIZE);
        }
        if cfg.deflate_on_oom {
            features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if cfg.free_page_reporting {
            features |= 1 << VIRTIO_BALLOON_F_REPORTING | 1 << VIRTIO_BALLOON_F_PAGE_POISON;
            queue_sizes.push(QUEUE_SIZE);
        }
        let handle = BalloonHandle {
            shared: shared.clone(),
        };
        let balloon = Balloon {
            shared,
            features,
            queue_sizes,
            stats_interval,
            timer,
            layout: Layout::default(),
            stats_head: None,
            poison_val: 0,
        };
        Ok((balloon, handle))
    }

    /// The API's side of this balloon (target, actual, statistics).
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    /// Drops the host pages of every PFN in the chain (inflate), or just
    /// accounts for them (deflate). PFNs outside guest RAM are counted and
    /// skipped; runs of consecutive PFNs go to madvise together.
    fn pfns(&self, mem: &GuestMemoryMmap, chain: Chain<'_>, inflate: bool) -> u32 {
        let counters = &self.shared.counters;
        let Ok(mut reader) = chain.reader(mem) else {
            warn_ratelimited!("virtio-balloon: PFN buffer outside guest memory");
            counters.invalid_pfns.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let count = reader.available_bytes() / 4;
        if count > MAX_PFNS_PER_CHAIN {
            warn_ratelimited!(
                "virtio-balloon: {count} PFNs in one chain; using the first {MAX_PFNS_PER_CHAIN}"
            );
        }
        // Inflate drops the pages; deflate only checks them, for the count.
        let apply = |gpa: u64, len: u64| {
            if inflate {
                discard(mem, gpa, len).is_ok()
            } else {
                mem.check_range(GuestAddress(gpa), crate::usize_of(len))
            }
        };
        let flush = |(first, n): (u64, u64)| {
            let (ok, bad) = if apply(first * PAGE_SIZE, n * PAGE_SIZE) {
                (n, 0)
            } else {
                // Part of the run is outside RAM: page by page, so that only
                // the bad PFNs are lost.
                (0..n).fold((0, 0), |(ok, bad), i| {
                    if apply((first + i) * PAGE_SIZE, PAGE_SIZE) {
                        (ok + 1, bad)
                    } else {
                        (ok, bad + 1)
                    }
                })
            };
            let which = if inflate {
                &counters.inflated_pages
            } else {
                &counters.deflated_pages
            };
            which.fetch_add(ok, Ordering::Relaxed);
            counters.invalid_pfns.fetch_add(bad, Ordering::Relaxed);
        };
        let mut run: Option<(u64, u64)> = None;
        for _ in 0..count.min(MAX_PFNS_PER_CHAIN) {
            let mut b = [0u8; 4];
            if reader.read_exact(&mut b).is_err() {
                break;
            }
            let pfn = u64::from(u32::from_le_bytes(b));
            run = match run {
                Some((first, n)) if first + n == pfn => Some((first, n + 1)),
                Some(r) => {
                    flush(r);
                    Some((pfn, 1))
                }
                None => Some((pfn, 1)),
            };
        }
        if let Some(r) = run {
            flush(r);
        }
        0
    }

    /// Free page reporting: every buffer of the chain is a free range.
    fn report(&self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
        let counters = &self.shared.counters;
        if self.poison_val != 0 {
            let bytes: u64 = chain.map(|d| u64::from(d.len())).sum();
            counters
                .poisoned_report_bytes
                .fetch_add(bytes, Ordering::Relaxed);
            warn_ratelimited!(
                "virtio-balloon: the guest poisons free pages with {:#x}; keeping reported pages",
                self.poison_val
            );
            return 0;
        }
        for desc in chain {
            match discard(mem, desc.addr().0, u64::from(desc.len())) {
                Ok(n) => {
                    counters.reported_bytes.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    warn_ratelimited!("virtio-balloon: ignoring free page report: {e}");
                    counters.invalid_reports.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        0
    }

    /// The guest (re)filled its stats buffer: keep the numbers, hold the
    /// buffer until the next tick.
    fn take_stats(&mut self, q: usize, ctx: &mut QueueCtx<'_>) {
        let mem = ctx.mem();
        let mut returned = false;
        let mut taken = 0;
        let result: Result<(), QueueBroken> = (|| loop {
            ctx.disable_notification(q)?;
            loop {
                if taken >= CHAIN_BUDGET {
                    // A guest that refills as fast as we return buffers
                    // must not hold the event loop.
                    ctx.requeue(q);
                    return Ok(());
                }
                let Some(chain) = ctx.pop(q)? else { break };
                taken += 1;
                // Linux keeps one buffer in flight; should a guest queue
                // more, the older one goes back at once.
                if let Some(old) = self.stats_head.take() {
                    ctx.add_used(q, old, 0);
                    returned = true;
                }
                let head = chain.head_index();
                match chain.reader(mem) {
                    Ok(mut r) => {
                        let s = BalloonStats::parse(&mut r);
                        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                        self.shared
                            .counters
                            .stats_updates
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        warn_ratelimited!("virtio-balloon: stats buffer outside guest memory")
                    }
                }
                self.stats_head = Some(head);
            }
            if !ctx.enable_notification(q)? {
                return Ok(());
            }
        })();
        // A corrupt ring is already recorded in ctx; the transport acts on it.
        let _ = result;
        if returned {
            ctx.notify(q);
        }
    }

    /// Time for fresh statistics: hand the held buffer back for a refill.
    fn request_stats(&mut self, ctx: &mut QueueCtx<'_>) {
        if let (Some(q), Some(head)) = (self.layout.stats, self.stats_head.take()) {
            ctx.add_used(q, head, 0);
            ctx.notify(q);
        }
    }
}

fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on an fd we own; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // num_pages, actual, free_page_hint_cmd_id, poison_val.
        let mut c = [0u8; 16];
        let target = self.shared.target_pages.load(Ordering::Acquire);
        c[..4].copy_from_slice(&target.to_le_bytes());
        let actual = self.shared.actual_pages.load(Ordering::Acquire);
        c[4..8].copy_from_slice(&actual.to_le_bytes());
        c[12..16].copy_from_slice(&self.poison_val.to_le_bytes());
        super::device::read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match (offset, <[u8; 4]>::try_from(data)) {
            (4, Ok(b)) => self
                .shared
                .actual_pages
                .store(u32::from_le_bytes(b), Ordering::Release),
            (12, Ok(b)) => self.poison_val = u32::from_le_bytes(b),
            _ => warn_ratelimited!(
                "virtio-balloon: ignoring {}-byte config write at {offset:#x}",
                data.len()
            ),
        }
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), ActivateError> {
        self.layout = Layout::for_features(acked_features);
        if let (Some(_), Some(every)) = (self.layout.stats, self.stats_interval) {
            self.timer
                .reset(every, Some(every))
                .map_err(|e| ActivateError::Backend(e.into()))?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.layout = Layout::default();
        self.stats_head = None;
        self.poison_val = 0;
        if let Err(e) = self.timer.clear() {
            warn_ratelimited!("virtio-balloon: cannot stop the stats timer: {e}");
        }
    }

    fn queue_notify(&mut self, index: usize, ctx: &mut QueueCtx<'_>) {
        match index {
            INFLATE => drain(ctx, INFLATE, |mem, c| self.pfns(mem, c, true)),
            DEFLATE => drain(ctx, DEFLATE, |mem, c| self.pfns(mem, c, false)),
            i if Some(i) == self.layout.stats => self.take_stats(i, ctx),
            i if Some(i) == self.layout.reporting => drain(ctx, i, |mem, c| self.report(mem, c)),
            _ => {}
        }
    }

    fn event_sources(&self) -> Vec<EventSource> {
        vec![
            EventSource {
                fd: self.shared.target_evt.as_raw_fd(),
                edge_triggered: false,
            },
            EventSource {
                fd: self.timer.as_raw_fd(),
                edge_triggered: false,
            },
        ]
    }

    fn handle_event(&mut self, source: usize, ctx: Option<&mut QueueCtx<'_>>) {
        match source {
            EVT_TARGET => {
                // Consume the event even when inactive: the loop watches it
                // level-triggered. The driver reads the target at DRIVER_OK.
                let _ = self.shared.target_evt.read();
                if let Some(ctx) = ctx {
                    ctx.irq().signal_config_change();
                }
            }
            EVT_STATS_TIMER => {
                let _ = self.timer.wait();
                if let Some(ctx) = ctx {
                    self.request_stats(ctx);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
