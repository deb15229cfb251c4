//! The vCPU event protocol without KVM: a thread that runs `handle_events`
//! in a loop stands in for the run loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use super::*;

const WAIT: Duration = Duration::from_secs(5);

/// A fake vCPU: counts its "runs" between event checks, attached to
/// `control` like a real one.
fn fake_vcpu(control: &Arc<VmControl>, index: u32) -> (VcpuHandle, Arc<AtomicU64>) {
    register_kick_handler().unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let (events_tx, events) = mpsc::channel();
    let (responses, responses_rx) = mpsc::channel();
    let thread_runs = runs.clone();
    let thread_control = control.clone();
    let thread = threads::spawn(ThreadKind::Vcpu(index), move || {
        while handle_events(&events, &responses) && !thread_control.stopping() {
            thread_runs.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .unwrap();
    control.attach(VcpuLink {
        events: events_tx,
        thread: std::os::unix::thread::JoinHandleExt::as_pthread_t(&thread),
    });
    (VcpuHandle::new(index, responses_rx, thread), runs)
}

#[test]
fn pause_stops_the_run_loop_until_resume() {
    let control = VmControl::new().unwrap();
    let (h, runs) = fake_vcpu(&control, 0);
    assert_eq!(control.broadcast(VcpuEvent::Pause), 1);
    h.expect(VcpuResponse::Paused, WAIT).unwrap();
    let at_pause = runs.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(runs.load(Ordering::SeqCst), at_pause, "ran while paused");

    control.broadcast(VcpuEvent::Resume);
    h.expect(VcpuResponse::Resumed, WAIT).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(runs.load(Ordering::SeqCst) > at_pause, "did not run again");

    control.request_exit(ExitOutcome::Stopped("test".into()));
    control.detach_all();
    h.join();
}

#[test]
fn a_stop_ends_a_paused_vcpu() {
    let control = VmControl::new().unwrap();
    let (a, _) = fake_vcpu(&control, 0);
    let (b, _) = fake_vcpu(&control, 1);
    assert_eq!(control.broadcast(VcpuEvent::Pause), 2);
    a.expect(VcpuResponse::Paused, WAIT).unwrap();
    b.expect(VcpuResponse::Paused, WAIT).unwrap();
    control.request_exit(ExitOutcome::GuestPowerOff);
    // Both threads end: their answer channels close.
    assert_eq!(
        a.expect(VcpuResponse::Resumed, WAIT),
        Err(VcpuHandleError::Gone { index: 0 })
    );
    assert_eq!(
        b.expect(VcpuResponse::Resumed, WAIT),
        Err(VcpuHandleError::Gone { index: 1 })
    );
    control.detach_all();
    a.join();
    b.join();
    assert_eq!(control.outcome(), Some(ExitOutcome::GuestPowerOff));
    // After detach a stop or pause reaches nobody, and nothing is kicked.
    assert_eq!(control.broadcast(VcpuEvent::Pause), 0);
}

#[test]
fn a_repeated_pause_is_answered_again() {
    let (tx, rx) = mpsc::channel();
    let (rtx, rrx) = mpsc::channel();
    tx.send(VcpuEvent::Pause).unwrap();
    tx.send(VcpuEvent::Pause).unwrap();
    tx.send(VcpuEvent::Resume).unwrap();
    assert!(handle_events(&rx, &rtx));
    let answers: Vec<VcpuResponse> = rrx.try_iter().collect();
    assert_eq!(
        answers,
        [
            VcpuResponse::Paused,
            VcpuResponse::Paused,
            VcpuResponse::Resumed
        ]
    );
    tx.send(VcpuEvent::Exit).unwrap();
    assert!(!handle_events(&rx, &rtx));
    drop(tx);
    assert!(!handle_events(&rx, &rtx), "a closed channel ends the loop");
}
