use super::*;

#[test]
fn a_limiter_throttles_counts_the_time_and_resumes_on_its_timer() {
    let mut l = RateLimiter::new(Limits {
        bytes_per_s: None,
        ops_per_s: Some(100),
    })
    .unwrap();
    assert!(l.timer_fd().is_some());
    let t0 = Instant::now();
    for _ in 0..100 {
        assert!(l.admit_at(t0));
        l.charge(4096);
    }
    assert!(!l.admit_at(t0), "101st operation in one instant");
    assert!(l.is_throttled());
    assert!(
        !l.admit_at(t0 + Duration::from_secs(1)),
        "until the timer fires"
    );
    l.on_timer_at(t0 + Duration::from_millis(10));
    assert!(!l.is_throttled());
    assert_eq!(ms(&l.throttled_ns()), 10);
    assert!(l.admit_at(t0 + Duration::from_millis(10)));
}

#[test]
fn the_armed_timer_fires_when_the_bucket_is_positive() {
    let mut l = RateLimiter::new(Limits {
        bytes_per_s: Some(1000),
        ops_per_s: None,
    })
    .unwrap();
    assert!(l.admit());
    l.charge(1010);
    let start = Instant::now();
    assert!(!l.admit());
    let fd = l.timer_fd().unwrap();
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
    assert_eq!(n, 1, "timer did not fire");
    let waited = start.elapsed();
    assert!(
        (Duration::from_millis(5)..Duration::from_millis(500)).contains(&waited),
        "{waited:?} for 11 bytes at 1000 B/s"
    );
    l.on_timer();
    assert!(l.admit());
}

#[test]
fn unlimited_limiters_always_admit_and_have_no_timer() {
    let mut l = RateLimiter::new(Limits::UNLIMITED).unwrap();
    assert!(l.timer_fd().is_none());
    for _ in 0..10_000 {
        assert!(l.admit());
        l.charge(u64::MAX);
    }
    assert_eq!(ms(&l.throttled_ns()), 0);
}

#[test]
fn a_pile_of_operations_costs_at_most_one_second_and_throttling_sleeps_in_batches() {
    let mut l = RateLimiter::new(Limits {
        bytes_per_s: None,
        ops_per_s: Some(20_000),
    })
    .unwrap();
    let t0 = Instant::now();
    assert!(l.admit_at(t0));
    // A million notifications piled up in an eventfd.
    l.charge_many(1_000_000, 0);
    let wait = l.ops.as_ref().unwrap().wait();
    assert!(
        wait <= Duration::from_secs(1) + Duration::from_millis(1),
        "{wait:?}"
    );
    assert!(!l.admit_at(t0));
    l.on_timer_at(t0 + Duration::from_secs(1));
    // One token short: the device still sleeps MIN_THROTTLE, not 50 us.
    let t1 = t0 + Duration::from_secs(1);
    l.charge_many(20_000, 0);
    assert!(!l.admit_at(t1));
    let fd = l.timer_fd().unwrap();
    let mut spec = std::mem::MaybeUninit::<libc::itimerspec>::zeroed();
    // SAFETY: timerfd_gettime writes one itimerspec into `spec`.
    assert_eq!(unsafe { libc::timerfd_gettime(fd, spec.as_mut_ptr()) }, 0);
    // SAFETY: initialised by the successful call above.
    let spec = unsafe { spec.assume_init() };
    let armed = Duration::new(
        u64::try_from(spec.it_value.tv_sec).unwrap(),
        u32::try_from(spec.it_value.tv_nsec).unwrap(),
    );
    assert!(armed > MIN_THROTTLE / 2, "armed for {armed:?}");
}
