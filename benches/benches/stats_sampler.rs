//! Cost of one `ksmvm::stats::Sampler::sample()` (one smaps pass plus
//! ksm_stat) and of `sample_fresh()` (what `GET /stats` runs: mincore and
//! ksm_stat, smaps only when older than its maximum age) for a VMM whose
//! guest RAM is a touched 1 GiB mapping. Target (stats issue): <= 1 ms per
//! sample.
//!
//! Run: `cargo bench -p ksmvm-bench --bench stats_sampler`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ksmvm::stats::Sampler;

const GIB: usize = 1 << 30;

/// A private anonymous mapping, every page written, unmapped on drop.
struct Touched {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Touched {
    fn new(len: usize, advice: libc::c_int) -> Self {
        // SAFETY: a fresh private anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap 1 GiB");
        // SAFETY: the range is the mapping just made; advice only.
        let rc = unsafe { libc::madvise(ptr, len, advice) };
        assert_eq!(rc, 0, "madvise");
        for off in (0..len).step_by(4096) {
            // SAFETY: inside the mapping, which is writable.
            unsafe { ptr.cast::<u8>().add(off).write_volatile(1) };
        }
        Self { ptr, len }
    }

    fn region(&self) -> (u64, u64) {
        (self.ptr as u64, self.len as u64)
    }
}

impl Drop for Touched {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

fn bench(c: &mut Criterion, name: &str, advice: libc::c_int) {
    let mem = Touched::new(GIB, advice);
    let mut sampler = Sampler::new([mem.region()]).expect("sampler");
    let first = sampler.sample().expect("sample");
    assert_eq!(first.guest_ram.rss, GIB as u64, "the whole GiB is resident");
    c.bench_function(name, |b| {
        b.iter(|| black_box(sampler.sample().expect("sample")))
    });
}

/// The API's path: residency (mincore) and ksm_stat on every call, the
/// smaps detail reused while younger than the given age.
fn bench_fresh(c: &mut Criterion) {
    let mem = Touched::new(GIB, libc::MADV_MERGEABLE);
    let mut sampler = Sampler::new([mem.region()]).expect("sampler");
    sampler.sample().expect("sample");
    let age = Duration::from_secs(3600);
    c.bench_function("sample_fresh_1gib_touched_mergeable", |b| {
        b.iter(|| black_box(sampler.sample_fresh(age).expect("sample")))
    });
}

fn samplers(c: &mut Criterion) {
    // 4 KiB pages: 262,144 PTEs to walk, the worst case.
    bench(c, "sample_1gib_touched_4k_pages", libc::MADV_NOHUGEPAGE);
    // As ksmvm maps guest RAM: KSM-mergeable (THP as the kernel decides).
    bench(c, "sample_1gib_touched_mergeable", libc::MADV_MERGEABLE);
    bench_fresh(c);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    targets = samplers
}
criterion_main!(benches);
