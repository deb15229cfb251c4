//! Many start/stop cycles of a probe VM with a disk, a TAP and an rng
//! device (issue 12): afterwards the harness holds no more file
//! descriptors, threads or memory than before, and no VMM left anything
//! behind: no process, no TAP still held, no API socket, no file in its
//! runtime directory. Each cycle stops the VM one of three ways in turn:
//! the guest powers off, `PUT /actions {"action":"shutdown"}`, SIGTERM.
//!
//! Ignored by default (~1,000 boots): `cargo test -p ksmvm --test cycles --
//! --ignored` (`KSMVM_CYCLES=N` for another count; it needs /dev/kvm and
//! root for the TAP; with `CI=true` their absence fails it).

use std::path::Path;
use std::time::{Duration, Instant};

use ksmvm::api::Action;
use ksmvm_testkit::proc::{children, fd_count, rss_bytes, thread_count};
use ksmvm_testkit::*;

const NAME: &str = "cycle";
const TAP: &str = "ctap0";
const T: Duration = Duration::from_secs(30);
/// Growth of the harness's RSS allowed over all cycles (allocator slack:
/// the serial lines of one VM are kept until it is dropped).
const RSS_SLACK: u64 = 16 << 20;

/// The harness's own resources.
#[derive(Debug, Clone, Copy)]
struct Harness {
    fds: usize,
    threads: usize,
    rss: u64,
}

impl Harness {
    fn sample() -> Harness {
        let me = std::process::id();
        Harness {
            fds: fd_count(me).expect("count fds"),
            threads: thread_count(me).expect("count threads"),
            rss: rss_bytes(me).expect("read VmRSS"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    GuestPowerOff,
    ApiShutdown,
    Sigterm,
}

/// Boots the probe, waits for READY, stops it with `how`; returns the VMM
/// for inspection.
fn cycle(ns: &NetNs, run: &RuntimeDir, img: &Path, how: Stop) -> Vmm {
    let args = probe_args(
        "",
        &[
            "--mem-mib",
            "64",
            "--name",
            NAME,
            "--disk",
            &format!("path={}", img.display()),
            "--net",
            &format!("tap={TAP}"),
            "--shutdown-timeout-s",
            "0",
        ],
    );
    let mut vm = Launch::new(args).netns(ns).runtime_dir(run.path()).start();
    vm.expect_line("PROBE READY", T);
    match how {
        Stop::GuestPowerOff => vm.send("poweroff"),
        Stop::ApiShutdown => {
            let api = vm.api(NAME);
            let deadline = Instant::now() + T;
            while let Err(e) = api.action(Action::Shutdown) {
                assert!(Instant::now() < deadline, "PUT /actions shutdown: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Stop::Sigterm => vm.terminate(),
    }
    let status = vm.try_wait_exit(T);
    assert!(
        status.is_some_and(|s| s.success()),
        "{how:?}: the VMM exited {status:?}{}",
        vm.context()
    );
    let stderr = vm.stderr_text();
    assert!(
        !stderr.contains("ksmvm: error:"),
        "{how:?}: the VMM logged an error: {stderr}"
    );
    vm
}

/// What a stopped VMM must not leave behind.
fn assert_clean(i: u64, how: Stop, vm: &Vmm, ns: &NetNs, run: &RuntimeDir) {
    let me = std::process::id();
    let left: Vec<String> = std::fs::read_dir(run.path())
        .expect("read the runtime directory")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.is_empty(),
        "cycle {i} ({how:?}): left in the runtime directory: {left:?}{}",
        vm.context()
    );
    let kids = children(me);
    assert!(
        kids.is_empty(),
        "cycle {i} ({how:?}): processes left: {kids:?}"
    );
    let attached = ns.tap_attached(TAP).expect("TAP flags");
    assert!(!attached, "cycle {i} ({how:?}): {TAP} is still held open");
    let links = ns.links().expect("links");
    assert_eq!(
        links,
        ["lo", TAP],
        "cycle {i} ({how:?}): links in the namespace"
    );
}

/// The `permille`-th quantile of sorted `d`, in ms.
fn ms_at(d: &[Duration], permille: usize) -> f64 {
    let i = d.len().saturating_sub(1) * permille / 1000;
    d.get(i).map_or(0.0, |t| t.as_secs_f64() * 1000.0)
}

#[test]
#[ignore = "1,000 VM start/stop cycles (minutes): run on its own, see the module documentation"]
fn a_thousand_start_stop_cycles_leak_nothing() {
    if !have_tap() {
        return;
    }
    let cycles: u64 = std::env::var("KSMVM_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let ns = NetNs::new("cycles");
    ns.add_tap(TAP);
    let dir = TempDir::new("cycles");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create the disk image");
    let run = RuntimeDir::new();
    let stops = [Stop::GuestPowerOff, Stop::ApiShutdown, Stop::Sigterm];

    // One cycle first, so that what the harness makes once (the probe
    // build, the netns thread's leftovers, allocator arenas) is in the
    // baseline.
    drop(cycle(&ns, &run, &img, Stop::GuestPowerOff));
    settle(Harness::sample().threads);
    let before = Harness::sample();
    let started = Instant::now();
    let mut times = Vec::new();
    for i in 0..cycles {
        let how = stops[usize::try_from(i % 3).unwrap_or(0)];
        let t0 = Instant::now();
        let vm = cycle(&ns, &run, &img, how);
        times.push(t0.elapsed());
        assert_clean(i, how, &vm, &ns, &run);
        drop(vm);
        if (i + 1) % 100 == 0 {
            let h = Harness::sample();
            eprintln!(
                "{} cycles, {:.0} s: harness fds {} threads {} rss {} MiB",
                i + 1,
                started.elapsed().as_secs_f64(),
                h.fds,
                h.threads,
                h.rss >> 20
            );
        }
    }
    let total = started.elapsed();
    let after = settle(before.threads);
    times.sort_unstable();
    eprintln!(
        "{cycles} cycles in {:.1} s: per cycle p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; harness before {before:?}, after {after:?}",
        total.as_secs_f64(),
        ms_at(&times, 500),
        ms_at(&times, 990),
        ms_at(&times, 1000),
    );
    assert_eq!(after.fds, before.fds, "the harness's file descriptors");
    assert!(
        after.threads <= before.threads,
        "the harness's threads: {} before, {} after",
        before.threads,
        after.threads
    );
    assert!(
        after.rss <= before.rss + RSS_SLACK,
        "the harness's RSS grew from {} to {} MiB",
        before.rss >> 20,
        after.rss >> 20
    );
}

/// Waits (up to 5 s) for the harness's threads to come down to `threads`
/// (the kit's output readers end with their VMM's pipes), then samples.
fn settle(threads: usize) -> Harness {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let h = Harness::sample();
        if h.threads <= threads || Instant::now() >= deadline {
            return h;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
