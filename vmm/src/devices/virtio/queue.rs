//! Defensive access to a device's queues while it serves them.
//!
//! virtio-queue already bounds what one descriptor chain can do (its
//! iterator stops after `queue size` descriptors, so loops end, and every
//! buffer is checked against guest memory before it is read or written).
//! What it leaves to the device is the ring as a whole: an available index
//! that runs more than a queue's worth ahead is a corrupt ring, which we
//! answer with DEVICE_NEEDS_RESET rather than a retry loop, and one busy
//! queue must not starve the other devices on the event loop.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::Interrupt;
use super::limiter::RateLimiter;

/// A descriptor chain in guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// How many chains one queue may complete before it yields the event loop
/// to the other devices (it asks to be called again through its own
/// notification EventFd).
pub const CHAIN_BUDGET: usize = 256;

/// The ring is corrupt; the device must stop serving until the guest resets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("virtio queue is corrupt")]
pub struct QueueBroken;

/// What a device sees of its queues while it runs.
#[derive(Debug)]
pub struct QueueCtx<'a> {
    mem: &'a GuestMemoryMmap,
    queues: &'a mut [Queue],
    irq: &'a Interrupt,
    notifiers: &'a [EventFd],
    broken: bool,
}

impl<'a> QueueCtx<'a> {
    /// `notifiers[i]` is queue i's notification EventFd (see [`Self::requeue`]).
    pub fn new(
        mem: &'a GuestMemoryMmap,
        queues: &'a mut [Queue],
        irq: &'a Interrupt,
        notifiers: &'a [EventFd],
    ) -> Self {
        Self {
            mem,
            queues,
            irq,
            notifiers,
            broken: false,
        }
    }

    pub fn mem(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    pub fn irq(&self) -> &'a Interrupt {
        self.irq
    }

    /// True once a queue was found corrupt during this call.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The queue if the driver set it up and enabled it.
    fn ready_queue(&mut self, index: usize) -> Option<&mut Queue> {
        self.queues.get_mut(index).filter(|q| q.ready())
    }

    /// True if the driver enabled queue `index`.
    pub fn is_ready(&self, index: usize) -> bool {
        self.queues.get(index).is_some_and(|q| q.ready())
    }

    fn fail(&mut self, index: usize, what: &str, e: virtio_queue::Error) -> QueueBroken {
        warn_ratelimited!("virtio: queue {index}: {what}: {e}; device needs reset");
        self.broken = true;
        QueueBroken
    }

    /// The next available chain, or None when the ring is empty or the queue
    /// is not enabled.
    pub fn pop(&mut self, index: usize) -> Result<Option<Chain<'a>>, QueueBroken> {
        if self.broken {
            return Err(QueueBroken);
        }
        let mem = self.mem;
        let Some(q) = self.ready_queue(index) else {
            return Ok(None);
        };
        match q.iter(mem) {
            Ok(mut it) => Ok(it.next()),
            Err(e) => Err(self.fail(index, "cannot read the available ring", e)),
        }
    }

    /// Returns a chain to the driver with `len` bytes written into it.
    pub fn add_used(&mut self, index: usize, head: u16, len: u32) {
        let mem = self.mem;
        if let Some(q) = self.ready_queue(index) {
            // Fails only for a head index past the queue size, which a guest
            // can put in its available ring; such a chain has no descriptors
            // to return, so dropping it loses nothing.
            if let Err(e) = q.add_used(mem, head, len) {
                warn_ratelimited!("virtio: queue {index}: cannot return chain {head}: {e}");
            }
        }
    }

    /// Asks the driver not to notify while the device is busy with the queue.
    pub fn disable_notification(&mut self, index: usize) -> Result<(), QueueBroken> {
        let mem = self.mem;
        match self.ready_queue(index).map(|q| q.disable_notification(mem)) {
            Some(Err(e)) => Err(self.fail(index, "cannot disable notifications", e)),
            _ => Ok(()),
        }
    }

    /// Asks the driver to notify again; true if chains arrived meanwhile (the
    /// caller must look again, or it would sleep on work that is there).
    pub fn enable_notification(&mut self, index: usize) -> Result<bool, QueueBroken> {
        let mem = self.mem;
        match self.ready_queue(index).map(|q| q.enable_notification(mem)) {
            Some(Ok(more)) => Ok(more),
            Some(Err(e)) => Err(self.fail(index, "cannot enable notifications", e)),
            None => Ok(false),
        }
    }

    /// Interrupts the driver for used chains in queue `index`, unless it
    /// asked (through the event index) not to be.
    pub fn notify(&mut self, index: usize) {
        let mem = self.mem;
        let needed = match self.ready_queue(index) {
            // When the event index cannot be read, interrupt anyway: a
            // spurious interrupt is harmless, a missing one stalls the guest.
            Some(q) => q.needs_notification(mem).unwrap_or(true),
            None => false,
        };
        if needed {
            self.irq.signal_used_queue();
        }
    }

    /// Makes the event loop come back to queue `index` after it has served
    /// everything else that is pending.
    pub fn requeue(&self, index: usize) {
        if let Some(evt) = self.notifiers.get(index) {
            if let Err(e) = evt.write(1) {
                warn_ratelimited!("virtio: queue {index}: cannot requeue: {e}");
            }
        }
    }
}

/// Serves queue `index` the usual way: every available chain goes through
/// `handle`, which returns the number of bytes it wrote into the chain, and
/// is returned to the driver. Stops after [`CHAIN_BUDGET`] chains (and
/// requeues itself) so that a guest that keeps its queue full cannot hold the
/// event loop.
pub fn drain<'a, F>(ctx: &mut QueueCtx<'a>, index: usize, mut handle: F)
where
    F: FnMut(&'a GuestMemoryMmap, Chain<'a>) -> u32,
{
    drain_limited(ctx, index, &mut RateLimiter::unlimited(), |mem, chain| {
        (handle(mem, chain), 0)
    });
}

/// [`drain`] under a rate limiter: `handle` also returns the bytes to
/// charge for the chain, and serving stops while `limiter` says wait (its
/// timer, an event source of the device, brings the device back).
pub fn drain_limited<'a, F>(
    ctx: &mut QueueCtx<'a>,
    index: usize,
    limiter: &mut RateLimiter,
    mut handle: F,
) where
    F: FnMut(&'a GuestMemoryMmap, Chain<'a>) -> (u32, u64),
{
    let mut done = 0usize;
    let result: Result<(), QueueBroken> = (|| loop {
        ctx.disable_notification(index)?;
        loop {
            if !limiter.admit() {
                return Ok(());
            }
            let Some(chain) = ctx.pop(index)? else { break };
            let head = chain.head_index();
            let (len, bytes) = handle(ctx.mem(), chain);
            limiter.charge(bytes);
            ctx.add_used(index, head, len);
            done += 1;
            if done >= CHAIN_BUDGET {
                ctx.requeue(index);
                return Ok(());
            }
        }
        if !ctx.enable_notification(index)? {
            return Ok(());
        }
    })();
    if done > 0 {
        ctx.notify(index);
    }
    // A corrupt ring is already recorded in ctx; the transport acts on it.
    let _ = result;
}
