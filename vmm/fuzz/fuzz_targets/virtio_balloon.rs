//! virtio-balloon: inflate, deflate, statistics and free page reporting
//! queues fed chains of any shape and PFN lists of any content, plus
//! statistics ticks, target changes and config writes, against the real
//! device and real guest memory (inflating really drops pages with
//! MADV_DONTNEED).
//!
//! Checks: every used length is 0; inflate/deflate/reporting return every
//! chain in order, the statistics queue holds the newest buffer and returns
//! the one it held; the page counters follow the PFNs exactly (valid:
//! the page is guest RAM; otherwise counted invalid, as is a list that is
//! not in guest memory); reported bytes are the whole pages of each range
//! in RAM; inflated and reported pages read as zero afterwards and nothing
//! else in guest memory changes but the used ring; the latest statistics
//! are those of the newest buffer. When the guest gives up the pages its
//! own rings live in, only "no panic" holds for the rest of the input.
//! Afterwards a well-formed inflate, deflate, statistics buffer and report
//! are served, before and after a reset.

#![no_main]

use std::io::Read;
use std::sync::atomic::Ordering;

use arbitrary::Arbitrary;
use ksmvm::devices::virtio::balloon::{
    MAX_PFNS_PER_CHAIN, VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};
use ksmvm::devices::virtio::mmio::REG_CONFIG;
use ksmvm::devices::virtio::test_util::Harness;
use ksmvm::devices::virtio::{Balloon, BalloonConfig, BalloonHandle};
use ksmvm_fuzz::*;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Arbitrary, Debug, Clone)]
enum Pfn {
    /// A page of the data regions (0..64: the first, 64..128: the second).
    Data(u8),
    /// A page of the rings.
    Rings(u8),
    /// Around the edges of RAM.
    Hole(u16),
    Raw(u32),
}

impl Pfn {
    fn value(&self) -> u32 {
        let data_pages = (DATA_LEN / PAGE) as u32;
        match self {
            Pfn::Data(i) => {
                let i = u32::from(*i) % (2 * data_pages);
                if i < data_pages {
                    (DATA0 / PAGE) as u32 + i
                } else {
                    (DATA1 / PAGE) as u32 + i - data_pages
                }
            }
            Pfn::Rings(i) => (RINGS / PAGE) as u32 + u32::from(*i) % 64,
            Pfn::Hole(i) => (DATA_LEN / PAGE) as u32 - 2 + u32::from(*i) % 0x300,
            Pfn::Raw(v) => *v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum BalContent {
    /// A PFN list; consecutive runs are likely.
    Pfns(Vec<Pfn>),
    Run {
        first: Pfn,
        count: u8,
    },
    /// Statistics entries (tag, value).
    Stats(Vec<(u8, u64)>),
    Bytes(Vec<u8>),
}

impl Content for BalContent {
    fn bytes(&self) -> Vec<u8> {
        match self {
            BalContent::Pfns(p) => p.iter().flat_map(|p| p.value().to_le_bytes()).collect(),
            BalContent::Run { first, count } => (0..u32::from(*count))
                .flat_map(|i| first.value().wrapping_add(i).to_le_bytes())
                .collect(),
            BalContent::Stats(s) => s
                .iter()
                .flat_map(|&(t, v)| {
                    let mut b = u16::from(t % 20).to_le_bytes().to_vec();
                    b.extend_from_slice(&v.to_le_bytes());
                    b
                })
                .collect(),
            BalContent::Bytes(b) => b.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Queue(Batch<BalContent>),
    /// The statistics timer fired.
    StatsTick,
    /// The API set a target (MiB); the event wakes the device.
    Target(u8),
    ConfigWrite {
        offset: u8,
        value: u32,
        width: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    deflate_on_oom: bool,
    reporting: bool,
    stats: bool,
    features: u64,
    sizes: [u8; 4],
    chaos: bool,
    ops: Vec<Op>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

struct Bal<'m> {
    d: Driver<'m>,
    handle: BalloonHandle,
    roles: Vec<Role>,
    /// The statistics buffer the device holds.
    held: Option<u16>,
    /// The guest gave up its own rings: nothing is predictable any more.
    relaxed: bool,
}

fn whole_pages(addr: u64, len: u64) -> (u64, u64) {
    let start = addr.div_ceil(PAGE) * PAGE;
    let end = (addr + len) / PAGE * PAGE;
    (start, end.saturating_sub(start))
}

fn all_zero(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    let mut b = vec![0u8; len as usize];
    mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b.iter().all(|&x| x == 0)
}

/// A statistics buffer's free_memory (tag 4) and total_memory (tag 5), as
/// the device must parse them: whole 10-byte entries, at most 64.
fn parse_stats(bytes: &[u8]) -> (Option<u64>, Option<u64>) {
    let (mut free, mut total) = (None, None);
    for e in bytes.chunks_exact(10).take(64) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let v = u64::from_le_bytes(e[2..10].try_into().unwrap());
        match tag {
            4 => free = Some(v),
            5 => total = Some(v),
            _ => {}
        }
    }
    (free, total)
}

impl Bal<'_> {
    fn reset(&mut self) {
        self.d.reset_and_reactivate();
        self.held = None;
        self.relaxed = false;
    }

    fn counters(&self) -> [u64; 5] {
        let c = self.handle.counters();
        [
            &c.inflated_pages,
            &c.deflated_pages,
            &c.invalid_pfns,
            &c.reported_bytes,
            &c.invalid_reports,
        ]
        .map(|a| a.load(Ordering::Relaxed))
    }

    fn batch(&mut self, b: &Batch<BalContent>) {
        let (q, sub) = self.d.submit(b);
        let role = self.roles[q];
        let size = self.d.queues[q].gq.size;
        let mem = self.d.mem;
        let used_before = self.d.queues[q].gq.used_idx();
        let before = self.counters();
        let stats_before = self.handle.counters().stats_updates.load(Ordering::Relaxed);
        let snap = (!self.d.chaos && !self.relaxed).then(|| Snapshot::take(mem));
        let chains = match sub {
            Submitted::Chains(c) => c,
            Submitted::Corrupt => {
                self.d.h.kick(q);
                if !self.d.chaos && !self.relaxed {
                    assert!(
                        !self.d.is_active() && self.d.needs_reset(),
                        "corrupt ring: still active"
                    );
                    assert!(self.d.used_since(q, used_before).is_empty());
                }
                self.reset();
                return;
            }
        };

        // The model: what each chain does to pages and counters.
        let mut valid = [0u64; 2]; // inflated, deflated
        let mut invalid_pfns = 0u64;
        let mut reported = 0u64;
        let mut invalid_reports = 0u64;
        let mut dropped: Vec<(u64, u64)> = Vec::new();
        // Pages given up by an inflate chain that it or a later chain
        // still reads its PFN list from.
        let mut clobbers = false;
        let mut stats_expect = None;
        let mut expected: Vec<(u16, Option<u64>)> = Vec::new();
        for (i, w) in chains.iter().enumerate() {
            let first_dropped = dropped.len();
            match role {
                Role::Inflate | Role::Deflate => {
                    match w.chain.clone().reader(mem) {
                        Err(_) => invalid_pfns += 1,
                        Ok(mut r) => {
                            let n = (r.available_bytes() / 4).min(MAX_PFNS_PER_CHAIN);
                            for _ in 0..n {
                                let mut b = [0u8; 4];
                                if r.read_exact(&mut b).is_err() {
                                    break;
                                }
                                let gpa = u64::from(u32::from_le_bytes(b)) * PAGE;
                                if in_ram(mem, gpa, PAGE) {
                                    valid[usize::from(role == Role::Deflate)] += 1;
                                    if role == Role::Inflate {
                                        dropped.push((gpa, PAGE));
                                    }
                                } else {
                                    invalid_pfns += 1;
                                }
                            }
                        }
                    }
                    expected.push((w.info.head, Some(0)));
                }
                Role::Reporting => {
                    for &(a, l, _) in &w.info.descs {
                        let l = u64::from(l);
                        if l == 0 {
                            continue;
                        }
                        if a.checked_add(l).is_none() || !in_ram(mem, a, l) {
                            invalid_reports += 1;
                        } else {
                            let (s, n) = whole_pages(a, l);
                            reported += n;
                            dropped.push((s, n));
                        }
                    }
                    expected.push((w.info.head, Some(0)));
                }
                Role::Stats => {
                    // The held buffer goes back first.
                    if let Some(old) = self.held.take() {
                        expected.push((old, Some(0)));
                    }
                    self.held = Some(w.info.head);
                    if let Ok(mut r) = w.chain.clone().reader(mem) {
                        let mut b = vec![0u8; r.available_bytes().min(640)];
                        let _ = r.read_exact(&mut b);
                        stats_expect = Some(parse_stats(&b));
                    }
                }
            }
            clobbers |= dropped[first_dropped..].iter().any(|&(a, l)| {
                chains[i..]
                    .iter()
                    .any(|w| w.info.readable().any(|(b, m)| overlaps(a, l, b, m)))
            });
        }
        let expected: Vec<(u16, Option<u64>)> =
            expected.into_iter().filter(|e| e.0 < size).collect();
        // Pages the guest gives up that hold its rings, or the PFN lists of
        // later chains in this batch: the rest is unpredictable.
        let hits_rings = dropped.iter().any(|&(a, l)| in_rings(a, l));
        drop(chains);
        self.d.h.kick(q);
        if self.d.chaos || self.relaxed || hits_rings {
            self.relaxed |= hits_rings;
            if !self.d.is_active() {
                self.reset();
            }
            return;
        }
        assert!(self.d.is_active(), "device stopped without a corrupt ring");
        let used = self.d.check_used(q, used_before, &expected);
        assert!(
            used.iter().all(|u| u.1 == 0),
            "balloon chain returned with a length"
        );
        let after = self.counters();
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        if !clobbers {
            assert_eq!(delta[0], valid[0], "inflated pages");
            assert_eq!(delta[1], valid[1], "deflated pages");
            assert_eq!(delta[2], invalid_pfns, "invalid PFNs");
            for &(a, l) in &dropped {
                assert!(all_zero(mem, a, l), "page {a:#x} given up but not zero");
            }
        }
        assert_eq!(delta[3], reported, "reported bytes");
        assert_eq!(delta[4], invalid_reports, "invalid reports");
        if role == Role::Stats {
            let updates =
                self.handle.counters().stats_updates.load(Ordering::Relaxed) - stats_before;
            if let Some((free, total)) = stats_expect {
                assert!(updates > 0);
                let s = self
                    .handle
                    .stats()
                    .expect("statistics after a stats buffer");
                assert_eq!((s.free_memory, s.total_memory), (free, total), "statistics");
            }
        }
        let mut allowed = dropped;
        allowed.push(self.d.queues[q].used_ring_range());
        if clobbers {
            // A PFN list read as zeros gives up page 0.
            allowed.push((0, PAGE));
        }
        if let Some(gpa) = snap.unwrap().changed_outside(mem, &allowed) {
            panic!("guest memory at {gpa:#x} changed outside the pages given up and the used ring");
        }
    }

    fn stats_tick(&mut self) {
        let q = self.roles.iter().position(|&r| r == Role::Stats);
        let before = q.map(|q| self.d.queues[q].gq.used_idx());
        let active = self.d.is_active();
        self.d.h.transport.handle_event(1);
        let (Some(q), Some(before)) = (q, before) else {
            return;
        };
        if self.d.chaos || self.relaxed || !active {
            return;
        }
        let size = self.d.queues[q].gq.size;
        let expected: Vec<(u16, Option<u64>)> = self
            .held
            .take()
            .filter(|&h| h < size)
            .map(|h| (h, Some(0)))
            .into_iter()
            .collect();
        self.d.check_used(q, before, &expected);
    }

    fn target(&mut self, mib: u8) {
        let ok = self.handle.set_target_mib(u64::from(mib)).is_ok();
        // Guest RAM is under 1 MiB here: only 0 is a valid target.
        assert_eq!(ok, mib == 0, "target {mib} MiB");
        self.d.h.transport.handle_event(0);
        let num_pages = u32::from_le_bytes(self.d.h.config(0, 4).try_into().unwrap());
        assert_eq!(num_pages, 0);
    }

    fn config_write(&mut self, offset: u8, value: u32, width: u8) {
        let width = [1usize, 2, 4, 8, 3][usize::from(width) % 5];
        let offset = u64::from(offset % 24);
        let before = self.handle.actual_pages();
        let bytes = u64::from(value).to_le_bytes();
        use ksmvm::devices::bus::BusDevice;
        self.d
            .h
            .transport
            .write(REG_CONFIG + offset, &bytes[..width]);
        let after = self.handle.actual_pages();
        if offset == 4 && width == 4 {
            assert_eq!(after, value, "actual not taken");
            let cfg = u32::from_le_bytes(self.d.h.config(4, 4).try_into().unwrap());
            assert_eq!(cfg, value);
        } else {
            assert_eq!(
                after, before,
                "config write at {offset} width {width} changed actual"
            );
        }
    }

    fn queue_of(&self, role: Role) -> Option<u8> {
        self.roles.iter().position(|&r| r == role).map(|q| q as u8)
    }

    fn one(&mut self, role: Role, descs: Vec<DescSpec<BalContent>>) {
        let Some(queue) = self.queue_of(role) else {
            return;
        };
        let b = Batch {
            queue,
            writes: vec![],
            chains: vec![ChainSpec::Direct(descs)],
            avail_skew: None,
        };
        self.batch(&b);
        assert!(self.d.is_active() && !self.relaxed);
    }

    fn well_formed(&mut self) {
        let mem = self.d.mem;
        mem.write_slice(&[0xaau8; 3 * PAGE as usize], GuestAddress(DATA0 + 3 * PAGE))
            .unwrap();
        let pfns = || {
            Some(BalContent::Run {
                first: Pfn::Data(3),
                count: 3,
            })
        };
        let before = self.counters();
        let list = |content| DescSpec {
            addr: Addr::Data0(0x3_f000),
            len: Len::Word(12),
            write: false,
            content,
        };
        self.one(Role::Inflate, vec![list(pfns())]);
        assert!(
            all_zero(mem, DATA0 + 3 * PAGE, 3 * PAGE),
            "inflated pages not dropped"
        );
        self.one(Role::Deflate, vec![list(pfns())]);
        let after = self.counters();
        assert_eq!((after[0] - before[0], after[1] - before[1]), (3, 3));
        if self.queue_of(Role::Stats).is_some() {
            let s = Some(BalContent::Stats(vec![(4, 12345), (5, 99999)]));
            self.one(
                Role::Stats,
                vec![DescSpec {
                    addr: Addr::Data0(0x3_e000),
                    len: Len::Word(20),
                    write: false,
                    content: s,
                }],
            );
            let s = self.handle.stats().expect("statistics");
            assert_eq!((s.free_memory, s.total_memory), (Some(12345), Some(99999)));
        }
        if self.queue_of(Role::Reporting).is_some() {
            mem.write_slice(&[0xbbu8; 0x3000], GuestAddress(DATA1 + 0x2000))
                .unwrap();
            let r0 = self.counters()[3];
            self.one(
                Role::Reporting,
                vec![DescSpec {
                    addr: Addr::Data1(0x2000),
                    len: Len::Word(0x3000),
                    write: true,
                    content: None,
                }],
            );
            assert_eq!(self.counters()[3] - r0, 0x3000);
            assert!(all_zero(mem, DATA1 + 0x2000, 0x3000));
        }
    }
}

fuzz_target!(|input: Input| {
    let mem = guest_memory();
    let cfg = BalloonConfig {
        deflate_on_oom: input.deflate_on_oom,
        free_page_reporting: input.reporting,
        stats_interval_s: u32::from(input.stats) * 3600,
    };
    let (balloon, handle) = Balloon::new(&cfg, &mem).unwrap();
    let mut h = Harness::with_mem(balloon, mem.clone());
    let features = input.features & h.device_features();
    let mut roles = vec![Role::Inflate, Role::Deflate];
    if features & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        roles.push(Role::Stats);
    }
    if features & (1 << VIRTIO_BALLOON_F_REPORTING) != 0 {
        roles.push(Role::Reporting);
    }
    let sizes: Vec<u16> = (0..roles.len())
        .map(|i| queue_size(input.sizes[i], 128))
        .collect();
    let mut d = Driver::new(h, &mem, features, &sizes, input.chaos);
    d.readable_outside_rings = true;
    let mut b = Bal {
        d,
        handle,
        roles,
        held: None,
        relaxed: false,
    };
    for op in input.ops.iter().take(16) {
        match op {
            Op::Queue(batch) => b.batch(batch),
            Op::StatsTick => b.stats_tick(),
            Op::Target(mib) => b.target(*mib),
            Op::ConfigWrite {
                offset,
                value,
                width,
            } => b.config_write(*offset, *value, *width),
        }
    }
    if b.d.chaos || b.relaxed || !b.d.is_active() {
        b.reset();
        b.d.chaos = false;
    } else {
        b.well_formed();
    }
    b.reset();
    b.well_formed();
});
