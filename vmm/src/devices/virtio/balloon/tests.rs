use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{REG_CONFIG, REG_INTERRUPT_STATUS};
use crate::devices::virtio::test_util::*;

const PFNS: u64 = DATA;
/// Pages the tests balloon: well above the queues and the PFN arrays.
const PAGES: u64 = 0x40_0000;

fn cfg(stats: u32, reporting: bool) -> BalloonConfig {
    BalloonConfig {
        deflate_on_oom: true,
        free_page_reporting: reporting,
        stats_interval_s: stats,
    }
}

struct Up<'a> {
    h: Harness,
    qs: Vec<GuestQueue<'a>>,
    mem: &'a GuestMemoryMmap,
    handle: BalloonHandle,
}

/// A balloon with `cfg`, the driver acking `extra` and setting up `nq` queues.
fn up<'a>(mem: &'a Arc<GuestMemoryMmap>, cfg: &BalloonConfig, extra: u64, nq: usize) -> Up<'a> {
    let (b, handle) = Balloon::new(cfg, mem).unwrap();
    let mut h = Harness::with_mem(b, mem.clone());
    let qs: Vec<GuestQueue<'a>> = (0..nq)
        .map(|i| GuestQueue::new(mem, 0x1_0000 * (i as u64 + 1), 16))
        .collect();
    let refs: Vec<&GuestQueue<'_>> = qs.iter().collect();
    h.activate(extra, &refs);
    Up { h, qs, mem, handle }
}

const STATS: u64 = 1 << VIRTIO_BALLOON_F_STATS_VQ;
const REPORTING: u64 = 1 << VIRTIO_BALLOON_F_REPORTING;

fn page_len() -> usize {
    usize::try_from(PAGE_SIZE).unwrap()
}

impl Up<'_> {
    fn fill(&self, page: u64, byte: u8) {
        self.mem
            .write_slice(&vec![byte; page_len()], GuestAddress(page * PAGE_SIZE))
            .unwrap();
    }

    fn page_is(&self, page: u64, byte: u8) -> bool {
        let mut b = vec![0u8; page_len()];
        self.mem
            .read_slice(&mut b, GuestAddress(page * PAGE_SIZE))
            .unwrap();
        b.iter().all(|&x| x == byte)
    }

    fn send_pfns(&mut self, q: usize, pfns: &[u32]) -> u16 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(PFNS)).unwrap();
        let head = self.qs[q].add(&[r(PFNS, u32_of(bytes.len()))]);
        self.h.kick(q);
        head
    }

    fn counters(&self) -> &BalloonCounters {
        self.handle.counters()
    }
}

#[test]
fn features_and_queues_follow_the_config() {
    let mem = guest_mem();
    let (b, _) = Balloon::new(&BalloonConfig::default(), &mem).unwrap();
    assert_eq!(b.queue_max_sizes().len(), 2);
    assert_eq!(
        b.features() & (STATS | REPORTING | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
        0
    );
    let (b, _) = Balloon::new(&cfg(5, true), &mem).unwrap();
    assert_eq!(b.queue_max_sizes().len(), 4);
    assert_eq!(
        b.features() & (STATS | REPORTING | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
        STATS | REPORTING | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    );
}

#[test]
fn queue_numbers_skip_absent_queues() {
    assert_eq!(Layout::for_features(0).stats, None);
    let l = Layout::for_features(STATS | REPORTING);
    assert_eq!((l.stats, l.reporting), (Some(2), Some(3)));
    let l = Layout::for_features(REPORTING);
    assert_eq!((l.stats, l.reporting), (None, Some(2)));
}

#[test]
fn inflate_drops_the_pages_and_skips_pfns_outside_ram() {
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(0, false), 0, 2);
    let base = PAGES / PAGE_SIZE;
    for p in base..base + 4 {
        u.fill(p, 0x77);
    }
    let outside = u32_of(MEM_SIZE as u64 / PAGE_SIZE) + 10;
    let b = u32_of(base);
    let head = u.send_pfns(INFLATE, &[b, b + 1, outside, b + 3, u32::MAX]);
    assert_eq!(u.qs[0].last_used(), (u32::from(head), 0));
    assert!(u.page_is(base, 0) && u.page_is(base + 1, 0) && u.page_is(base + 3, 0));
    assert!(u.page_is(base + 2, 0x77), "page not in the list kept");
    assert_eq!(u.counters().inflated_pages.load(Ordering::Relaxed), 3);
    assert_eq!(u.counters().invalid_pfns.load(Ordering::Relaxed), 2);
    assert_eq!(u.h.take_irq(), 1);
}

#[test]
fn a_run_crossing_the_end_of_ram_loses_only_its_bad_pages() {
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(0, false), 0, 2);
    let last = u32_of(MEM_SIZE as u64 / PAGE_SIZE - 1);
    u.fill(u64::from(last), 0x55);
    u.send_pfns(INFLATE, &[last, last + 1, last + 2]);
    assert!(u.page_is(u64::from(last), 0));
    assert_eq!(u.counters().inflated_pages.load(Ordering::Relaxed), 1);
    assert_eq!(u.counters().invalid_pfns.load(Ordering::Relaxed), 2);
}

#[test]
fn pfns_in_a_hole_between_ram_regions_are_ignored() {
    // RAM, a hole, RAM: like the MMIO gap below 4 GiB.
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MEM_SIZE),
            (GuestAddress(2 * MEM_SIZE as u64), MEM_SIZE),
        ])
        .unwrap(),
    );
    let mut u = up(&mem, &cfg(0, false), 0, 2);
    let hole = u32_of(MEM_SIZE as u64 * 3 / 2 / PAGE_SIZE);
    let high = u32_of(MEM_SIZE as u64 * 2 / PAGE_SIZE);
    u.fill(u64::from(high), 0x11);
    u.send_pfns(INFLATE, &[hole, hole + 1, high]);
    assert!(u.page_is(u64::from(high), 0));
    assert_eq!(u.counters().inflated_pages.load(Ordering::Relaxed), 1);
    assert_eq!(u.counters().invalid_pfns.load(Ordering::Relaxed), 2);
}

#[test]
fn deflate_counts_pages_and_touches_nothing() {
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(0, false), 0, 2);
    let p = PAGES / PAGE_SIZE;
    u.fill(p, 0x99);
    u.send_pfns(DEFLATE, &[u32_of(p), u32::MAX]);
    assert!(u.page_is(p, 0x99));
    assert_eq!(u.counters().deflated_pages.load(Ordering::Relaxed), 1);
    assert_eq!(u.counters().invalid_pfns.load(Ordering::Relaxed), 1);
}

#[test]
fn huge_pfn_arrays_are_capped() {
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(0, false), 0, 2);
    // 8 MiB of PFN array, all pointing at one page: 2M PFNs, capped.
    u.qs[0].add(&[r(PFNS, 8 << 20)]);
    u.h.kick(0);
    let seen = u.counters().inflated_pages.load(Ordering::Relaxed)
        + u.counters().invalid_pfns.load(Ordering::Relaxed);
    assert_eq!(seen, MAX_PFNS_PER_CHAIN as u64);
}

#[test]
fn target_and_actual_go_through_config_space() {
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(0, false), 0, 2);
    assert_eq!(u.h.config(0, 4), 0u32.to_le_bytes());
    u.handle.set_target_mib(4).unwrap();
    assert_eq!(u.handle.target_mib(), 4);
    assert_eq!(u.h.config(0, 4), 1024u32.to_le_bytes());
    // The event loop sees the handle's event and interrupts the guest.
    let gen =
        u.h.read32(crate::devices::virtio::mmio::REG_CONFIG_GENERATION);
    u.h.transport.handle_event(EVT_TARGET);
    assert_eq!(u.h.read32(REG_INTERRUPT_STATUS), 2);
    assert_eq!(u.h.take_irq(), 1);
    assert_ne!(
        u.h.read32(crate::devices::virtio::mmio::REG_CONFIG_GENERATION),
        gen
    );
    // The driver reports progress in `actual`.
    u.h.transport.write(
        crate::devices::virtio::mmio::REG_CONFIG + 4,
        &512u32.to_le_bytes(),
    );
    assert_eq!(u.handle.actual_pages(), 512);
    assert_eq!(u.handle.actual_mib(), 2);
    assert_eq!(u.h.config(4, 4), 512u32.to_le_bytes());
    // num_pages is the host's; odd writes are ignored.
    u.h.transport.write(
        crate::devices::virtio::mmio::REG_CONFIG,
        &7u32.to_le_bytes(),
    );
    u.h.transport
        .write(crate::devices::virtio::mmio::REG_CONFIG + 4, &[1]);
    assert_eq!(u.handle.target_mib(), 4);
    assert_eq!(u.handle.actual_pages(), 512);
}

#[test]
fn targets_beyond_guest_ram_are_refused() {
    let mem = guest_mem();
    let (_b, handle) = Balloon::new(&cfg(0, false), &mem).unwrap();
    let ram = MEM_SIZE as u64 >> 20;
    assert_eq!(
        handle.set_target_mib(ram + 1).unwrap_err().to_string(),
        format!(
            "balloon target of {} MiB exceeds guest RAM of {ram} MiB",
            ram + 1
        )
    );
    handle.set_target_mib(ram).unwrap();
    handle.set_target_mib(0).unwrap();
}

#[test]
fn target_events_are_consumed_while_inactive_without_interrupts() {
    let mem = guest_mem();
    let (b, handle) = Balloon::new(&cfg(0, false), &mem).unwrap();
    let evt_fd = b.event_sources()[EVT_TARGET].fd;
    let mut h = Harness::with_mem(b, mem.clone());
    handle.set_target_mib(1).unwrap();
    h.transport.handle_event(EVT_TARGET);
    assert_eq!(h.take_irq(), 0);
    // Consumed: a level-triggered loop would not wake again.
    let mut pfd = libc::pollfd {
        fd: evt_fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
    assert_eq!(h.config(0, 4), 256u32.to_le_bytes());
}

fn stats_buffer(mem: &GuestMemoryMmap, at: u64, entries: &[(u16, u64)]) -> u32 {
    let mut b = Vec::new();
    for &(t, v) in entries {
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    mem.write_slice(&b, GuestAddress(at)).unwrap();
    u32_of(b.len())
}

#[test]
fn stats_are_kept_and_the_buffer_returned_on_each_tick() {
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(1, false), STATS, 3);
    assert_eq!(u.handle.stats(), None);
    let n = stats_buffer(
        &mem,
        PFNS,
        &[(4, 1000), (5, 4000), (6, 2000), (7, 300), (99, 1)],
    );
    let head = u.qs[2].add(&[r(PFNS, n)]);
    u.h.kick(2);
    let s = u.handle.stats().unwrap();
    assert_eq!(s.free_memory, Some(1000));
    assert_eq!(s.total_memory, Some(4000));
    assert_eq!(s.available_memory, Some(2000));
    assert_eq!(s.disk_caches, Some(300));
    assert_eq!(s.swap_in, None);
    assert!(s.updated_unix_s > 0);
    assert_eq!(u.qs[2].used_idx(), 0, "buffer held until the next tick");

    u.h.transport.handle_event(EVT_STATS_TIMER);
    assert_eq!(u.qs[2].last_used(), (u32::from(head), 0));
    assert_eq!(u.h.take_irq(), 1);
    // A tick with no buffer held does nothing.
    u.h.transport.handle_event(EVT_STATS_TIMER);
    assert_eq!(u.qs[2].used_idx(), 1);

    let n = stats_buffer(&mem, PFNS, &[(4, 555)]);
    u.qs[2].add(&[r(PFNS, n)]);
    u.h.kick(2);
    assert_eq!(u.handle.stats().unwrap().free_memory, Some(555));
    assert_eq!(u.handle.counters().stats_updates.load(Ordering::Relaxed), 2);
}

#[test]
fn stats_timer_fires_at_the_configured_interval() {
    let mem = guest_mem();
    let (b, _handle) = Balloon::new(&cfg(1, false), &mem).unwrap();
    let timer_fd = b.event_sources()[EVT_STATS_TIMER].fd;
    let mut h = Harness::with_mem(b, mem.clone());
    let qs: Vec<GuestQueue<'_>> = (0..3)
        .map(|i| GuestQueue::new(&mem, 0x1_0000 * (i + 1), 16))
        .collect();
    h.activate(STATS, &[&qs[0], &qs[1], &qs[2]]);
    let mut pfd = libc::pollfd {
        fd: timer_fd,
        events: libc::POLLIN,
        revents: 0,
    };
    assert_eq!(
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 3000) },
        1,
        "timer did not fire"
    );
    h.transport.handle_event(EVT_STATS_TIMER);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0, "expiry consumed");
    // A reset stops the timer.
    h.write32(crate::devices::virtio::mmio::REG_STATUS, 0);
    assert_eq!(
        // SAFETY: as above.
        unsafe { libc::poll(&mut pfd, 1, 1300) },
        0,
        "timer still running after reset"
    );
}

#[test]
fn a_second_stats_buffer_returns_the_first() {
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(1, false), STATS, 3);
    let n = stats_buffer(&mem, PFNS, &[(4, 1)]);
    let first = u.qs[2].add(&[r(PFNS, n)]);
    u.qs[2].add(&[r(PFNS, n)]);
    u.h.kick(2);
    assert_eq!(u.qs[2].used_idx(), 1);
    assert_eq!(u.qs[2].last_used(), (u32::from(first), 0));
}

#[test]
fn free_page_reports_drop_whole_pages_in_ram() {
    let mem = guest_mem();
    // Reporting without stats: the reporting queue is number 2.
    let mut u = up(&mem, &cfg(0, true), REPORTING, 3);
    let p = PAGES / PAGE_SIZE;
    for i in 0..4 {
        u.fill(p + i, 0x42);
    }
    let head = u.qs[2].add(&[
        w(p * PAGE_SIZE, u32_of(2 * PAGE_SIZE)),
        w(FAR, 4096),
        w((p + 3) * PAGE_SIZE, 4096),
    ]);
    u.h.kick(2);
    assert_eq!(u.qs[2].last_used(), (u32::from(head), 0));
    assert!(u.page_is(p, 0) && u.page_is(p + 1, 0) && u.page_is(p + 3, 0));
    assert!(u.page_is(p + 2, 0x42));
    assert_eq!(
        u.counters().reported_bytes.load(Ordering::Relaxed),
        3 * PAGE_SIZE
    );
    assert_eq!(u.counters().invalid_reports.load(Ordering::Relaxed), 1);
}

/// Linux with `init_on_free=1` keeps reporting only with PAGE_POISON, and
/// writes its poison value (0: freed pages are zeroed) before DRIVER_OK.
#[test]
fn reporting_offers_page_poison_and_keeps_pages_the_guest_poisons() {
    let mem = guest_mem();
    let (b, _) = Balloon::new(&cfg(0, true), &mem).unwrap();
    assert_ne!(b.features() & 1 << VIRTIO_BALLOON_F_PAGE_POISON, 0);
    let (b, _) = Balloon::new(&cfg(0, false), &mem).unwrap();
    assert_eq!(b.features() & 1 << VIRTIO_BALLOON_F_PAGE_POISON, 0);

    let poison = 1 << VIRTIO_BALLOON_F_PAGE_POISON;
    let mut u = up(&mem, &cfg(0, true), REPORTING | poison, 3);
    let p = PAGES / PAGE_SIZE;
    // init_on_free: poison value 0, pages are dropped.
    u.h.write32(REG_CONFIG + 12, 0);
    assert_eq!(u.h.read32(REG_CONFIG + 12), 0);
    u.fill(p, 0x42);
    u.qs[2].add(&[w(p * PAGE_SIZE, 4096)]);
    u.h.kick(2);
    assert!(u.page_is(p, 0));
    // Page poisoning with 0xaa: the pages must keep what the guest wrote.
    u.h.write32(REG_CONFIG + 12, 0xaa);
    assert_eq!(u.h.read32(REG_CONFIG + 12), 0xaa);
    u.fill(p + 1, 0xaa);
    let head = u.qs[2].add(&[w((p + 1) * PAGE_SIZE, 4096)]);
    u.h.kick(2);
    assert_eq!(u.qs[2].last_used(), (u32::from(head), 0));
    assert!(u.page_is(p + 1, 0xaa));
    let c = u.counters();
    assert_eq!(c.reported_bytes.load(Ordering::Relaxed), PAGE_SIZE);
    assert_eq!(c.poisoned_report_bytes.load(Ordering::Relaxed), PAGE_SIZE);
}

#[test]
fn reset_forgets_the_held_stats_buffer() {
    let mem = guest_mem();
    let mut u = up(&mem, &cfg(1, false), STATS, 3);
    let n = stats_buffer(&mem, PFNS, &[(4, 1)]);
    u.qs[2].add(&[r(PFNS, n)]);
    u.h.kick(2);
    u.h.write32(crate::devices::virtio::mmio::REG_STATUS, 0);
    let qs: Vec<GuestQueue<'_>> = (0..3)
        .map(|i| GuestQueue::new(&mem, 0x10_0000 + 0x1_0000 * i, 16))
        .collect();
    u.h.activate(STATS, &[&qs[0], &qs[1], &qs[2]]);
    u.h.transport.handle_event(EVT_STATS_TIMER);
    assert_eq!(
        qs[2].used_idx(),
        0,
        "old buffer must not be returned into the new ring"
    );
    assert_eq!(
        u.handle.stats().unwrap().free_memory,
        Some(1),
        "numbers survive"
    );
}

fn battery(q: usize, features: u64, cfg: BalloonConfig) {
    let mem = guest_mem();
    let Up { mut h, mut qs, .. } = up(&mem, &cfg, features, q + 1);
    let vq = &mut qs[q];
    let pfn = u32_of(PAGES / PAGE_SIZE);
    mem.write_slice(&pfn.to_le_bytes(), GuestAddress(PFNS + 0x10_0000))
        .unwrap();
    hostile_battery(&mut h, vq, &mut |h| h.kick(q), &mut |h, vq| {
        let before = vq.used_idx();
        if q == 2 && features & STATS != 0 {
            // The stats queue holds its buffer: a tick hands back the last.
            vq.add(&[r(PFNS + 0x10_0000, 10)]);
            h.kick(q);
            h.transport.handle_event(EVT_STATS_TIMER);
        } else {
            vq.add(&[r(PFNS + 0x10_0000, 4)]);
            h.kick(q);
        }
        assert_ne!(vq.used_idx(), before, "device stopped serving");
    });
}

#[test]
fn inflate_survives_hostile_chains() {
    battery(INFLATE, 0, cfg(0, false));
}

#[test]
fn deflate_survives_hostile_chains() {
    battery(DEFLATE, 0, cfg(0, false));
}

#[test]
fn stats_queue_survives_hostile_chains() {
    battery(2, STATS, cfg(1, false));
}

#[test]
fn reporting_queue_survives_hostile_chains() {
    battery(2, REPORTING, cfg(0, true));
}
