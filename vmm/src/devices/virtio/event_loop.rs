//! The one thread on which all virtio device work runs.
//!
//! It sleeps in epoll on every queue's notification EventFd (signalled by
//! KVM through ioeventfds, so a guest's notification never exits to a vCPU
//! thread in userspace), every device's own event sources, and an exit
//! EventFd. vCPU threads only touch registers; they never run a request.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::limiter::RateLimiter;
use super::mmio::MmioTransport;
use crate::devices::bus::lock;

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the virtio event loop: {0}")]
    Setup(#[source] io::Error),
    #[error("cannot watch a virtio event: {0}")]
    Register(#[source] io::Error),
    #[error("cannot start the virtio event loop thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("the virtio event loop failed waiting for events: {0}")]
    Wait(#[source] io::Error),
    #[error("the virtio event loop thread panicked")]
    Panicked,
}

/// A device as the event loop sees it.
pub(crate) struct LoopDevice {
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Queue i's notification EventFd (a clone of the one KVM signals).
    pub queue_evts: Vec<EventFd>,
    /// How many queue notifications the device is served per second; a
    /// queue notified beyond that waits (its EventFd out of the epoll set)
    /// until the limiter's timer fires, and then is served once for all
    /// the notifications that arrived meanwhile.
    pub notify: RateLimiter,
    /// Queues waiting for the notify limiter.
    pub deferred: Vec<usize>,
}

const EXIT_TOKEN: u64 = u64::MAX;
const KIND_QUEUE: u64 = 1;
const KIND_SOURCE: u64 = 2;
const KIND_NOTIFY_TIMER: u64 = 3;

/// device index (32 bits) | kind (16 bits) | index within kind (16 bits).
fn token(device: usize, kind: u64, index: usize) -> u64 {
    (device as u64) << 32 | kind << 16 | (index as u64 & 0xffff)
}

fn untoken(t: u64) -> (usize, u64, usize) {
    (
        (t >> 32) as usize,
        (t >> 16) & 0xffff,
        (t & 0xffff) as usize,
    )
}

/// The running event loop. Dropping it stops and joins the thread.
pub struct EventLoopHandle {
    exit: EventFd,
    thread: Option<JoinHandle<Result<(), EventLoopError>>>,
}

impl std::fmt::Debug for EventLoopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoopHandle")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl EventLoopHandle {
    /// Asks the loop to exit; it finishes the event it is handling first.
    pub fn stop(&self) -> io::Result<()> {
        self.exit.write(1)
    }

    /// An EventFd that stops the loop when written (for signal handlers or
    /// a VM-exit path that does not own the handle).
    pub fn exit_eventfd(&self) -> io::Result<EventFd> {
        self.exit.try_clone()
    }

    /// Waits for the loop to exit (after `stop`), returning why it ended.
    pub fn join(mut self) -> Result<(), EventLoopError> {
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(), EventLoopError> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| EventLoopError::Panicked)?,
            None => Ok(()),
        }
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop();
            if let Err(e) = self.join_inner() {
                log::error!("{e}");
            }
        }
    }
}

/// Registers every device's events and starts the loop thread.
pub(crate) fn spawn(devices: Vec<LoopDevice>) -> Result<EventLoopHandle, EventLoopError> {
    let epoll = Epoll::new().map_err(EventLoopError::Setup)?;
    let exit = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Setup)?;
    let add = |fd: i32, events: EventSet, data: u64| {
        epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, data))
            .map_err(EventLoopError::Register)
    };
    add(exit.as_raw_fd(), EventSet::IN, EXIT_TOKEN)?;
    for (d, dev) in devices.iter().enumerate() {
        for (q, evt) in dev.queue_evts.iter().enumerate() {
            add(evt.as_raw_fd(), EventSet::IN, token(d, KIND_QUEUE, q))?;
        }
        let sources = lock(&dev.transport).event_sources();
        for (s, src) in sources.iter().enumerate() {
            let mut events = EventSet::IN;
            if src.edge_triggered {
                events |= EventSet::EDGE_TRIGGERED;
            }
            add(src.fd, events, token(d, KIND_SOURCE, s))?;
        }
        if let Some(fd) = dev.notify.timer_fd() {
            add(fd, EventSet::IN, token(d, KIND_NOTIFY_TIMER, 0))?;
        }
    }
    let thread = crate::threads::spawn(crate::threads::ThreadKind::VirtioDevices, move || {
        run(epoll, devices)
    })
    .map_err(EventLoopError::Spawn)?;
    Ok(EventLoopHandle {
        exit,
        thread: Some(thread),
    })
}

/// Watches (`IN`) or ignores (no events) a queue's EventFd.
fn watch(epoll: &Epoll, evt: &EventFd, data: u64, on: bool) {
    let events = if on { EventSet::IN } else { EventSet::empty() };
    if let Err(e) = epoll.ctl(
        ControlOperation::Modify,
        evt.as_raw_fd(),
        EpollEvent::new(events, data),
    ) {
        warn_ratelimited!("virtio: cannot change a queue notification's watch: {e}");
    }
}

fn run(epoll: Epoll, mut devices: Vec<LoopDevice>) -> Result<(), EventLoopError> {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(EventLoopError::Wait(e)),
        };
        for ev in &events[..n] {
            if ev.data() == EXIT_TOKEN {
                return Ok(());
            }
            let (d, kind, index) = untoken(ev.data());
            let Some(dev) = devices.get_mut(d) else {
                continue;
            };
            match kind {
                KIND_QUEUE => {
                    let Some(evt) = dev.queue_evts.get(index) else {
                        continue;
                    };
                    if !dev.notify.admit() {
                        // Left signalled: watching it again wakes us at once.
                        watch(&epoll, evt, ev.data(), false);
                        dev.deferred.push(index);
                        continue;
                    }
                    // Consume first: a notification that arrives while the
                    // queue is served wakes us again, and the queue code
                    // rechecks the ring before it re-enables notifications.
                    // The count is how many notifications the guest made
                    // (KVM adds one per write), and what it is charged.
                    let count = evt.read().unwrap_or(1);
                    dev.notify.charge_many(count, 0);
                    lock(&dev.transport).process_queue(index);
                }
                KIND_SOURCE => lock(&dev.transport).handle_event(index),
                KIND_NOTIFY_TIMER => {
                    dev.notify.on_timer();
                    for q in std::mem::take(&mut dev.deferred) {
                        if let Some(evt) = dev.queue_evts.get(q) {
                            watch(&epoll, evt, token(d, KIND_QUEUE, q), true);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for (d, k, i) in [
            (0, KIND_QUEUE, 0),
            (18, KIND_SOURCE, 3),
            (7, KIND_QUEUE, 65535),
        ] {
            assert_eq!(untoken(token(d, k, i)), (d, k, i));
            assert_ne!(token(d, k, i), EXIT_TOKEN);
        }
    }

    #[test]
    fn an_empty_loop_stops_and_joins() {
        let h = spawn(Vec::new()).unwrap();
        h.stop().unwrap();
        h.join().unwrap();
        // Dropping without an explicit stop also ends the thread.
        drop(spawn(Vec::new()).unwrap());
    }
}
