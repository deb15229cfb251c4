//! A disk's I/O thread: runs parsed requests against the image in the
//! order the guest queued them, writes each status byte, and hands the
//! completions back to the device loop through an EventFd. The device loop
//! therefore never waits on the disk, and a slow or hostile disk stalls
//! only its own guest.
//!
//! At stop the request being executed completes and those still queued are
//! failed (VIRTIO_BLK_S_IOERR, counted as `failed_at_stop`) without
//! touching the image; none is silently dropped, and nothing is
//! acknowledged to the guest that did not happen.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::image::DiskImage;
use super::request::{execute, finish, BlockCounters, Request, Status};

/// A finished request: its chain head and used length.
pub type Completion = (u16, u32);

#[derive(Debug, Default)]
struct State {
    completed: VecDeque<Completion>,
    /// Submitted and not yet executed.
    pending: usize,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    idle: Condvar,
    stopping: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
pub struct IoThread {
    tx: Option<Sender<Request>>,
    shared: Arc<Shared>,
    done: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    pub fn spawn(
        disk: Arc<DiskImage>,
        mem: GuestMemoryMmap,
        counters: Arc<BlockCounters>,
    ) -> io::Result<Self> {
        let (tx, rx) = channel::<Request>();
        let shared = Arc::new(Shared::default());
        let done = EventFd::new(EFD_NONBLOCK)?;
        let signal = done.try_clone()?;
        let s = shared.clone();
        let thread = crate::threads::spawn(crate::threads::ThreadKind::BlockIo, move || {
            let mut bounce = Vec::new();
            for req in rx {
                let status = if s.stopping.load(Ordering::Acquire) {
                    counters.failed_at_stop.fetch_add(1, Ordering::Relaxed);
                    Status::IoErr
                } else {
                    execute(&disk, &mem, &counters, &mut bounce, &req.op)
                };
                let len = finish(&mem, &counters, &req, status);
                let mut st = s.lock();
                st.completed.push_back((req.head, len));
                st.pending -= 1;
                drop(st);
                s.idle.notify_all();
                if let Err(e) = signal.write(1) {
                    warn_ratelimited!("virtio-blk: cannot signal a completion: {e}");
                }
            }
        })?;
        Ok(Self {
            tx: Some(tx),
            shared,
            done,
            thread: Some(thread),
        })
    }

    /// The EventFd that becomes readable when requests complete.
    pub fn done_fd(&self) -> &EventFd {
        &self.done
    }

    /// Queues `req`, or gives it back if the thread is gone.
    pub fn submit(&self, req: Request) -> Result<(), Request> {
        let Some(tx) = &self.tx else { return Err(req) };
        self.shared.lock().pending += 1;
        tx.send(req).map_err(|e| {
            self.shared.lock().pending -= 1;
            e.0
        })
    }

    /// The requests finished since the last call, in order.
    pub fn take_completed(&self) -> VecDeque<Completion> {
        let _ = self.done.read();
        std::mem::take(&mut self.shared.lock().completed)
    }

    /// Waits until every submitted request has executed (its status is in
    /// guest memory), at most `timeout`; true if it did.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = match self.shared.idle.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }

    /// Fails what is still queued, lets the running request finish and
    /// ends the thread.
    pub fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.tx = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("virtio-blk: the I/O thread panicked");
            }
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}
