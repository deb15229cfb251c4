//! The 16550A UART at 0x3f8 (vm-superio's model), with guest output to the
//! configured sink and host input fed in as the guest drains its FIFO.
//! The sink and its bounds (rate limit, marked lines on stdout, rotation of
//! `file:` sinks) are in [`output`].

mod output;

pub use output::{
    marks_stdout, open as open_output, rotated_path, SerialCounters, SerialStats,
    GUEST_LINE_PREFIX, MAX_LINE,
};

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Raises the UART's IRQ through an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOut = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOut>,
    /// Host input the FIFO could not take yet; never dropped.
    pending: VecDeque<u8>,
    /// The output's counters (bytes written, dropped by the rate limit).
    stats: Arc<SerialStats>,
}

// The UART holds the output sink, a trait object.
impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// The UART register at `offset` for a one-byte access; None for any other
/// access (the UART has eight registers).
fn register(offset: u64, data_len: usize) -> Option<u8> {
    u8::try_from(offset)
        .ok()
        .filter(|reg| data_len == 1 && *reg <= 7)
}

impl SerialDevice {
    /// A UART writing to `out`, whose counters are `stats` (see
    /// [`open_output`]).
    pub fn new(irq: EventFd, out: SerialOut, stats: Arc<SerialStats>) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
            pending: VecDeque::new(),
            stats,
        }
    }

    /// The output's counters, to be read without the device's lock.
    pub fn stats(&self) -> Arc<SerialStats> {
        self.stats.clone()
    }

    /// Queues host input for the guest.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.pending.extend(bytes);
        self.fill_fifo();
    }

    fn fill_fifo(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let n = self.uart.fifo_capacity().min(self.pending.len());
            let chunk: Vec<u8> = self.pending.iter().take(n).copied().collect();
            match self.uart.enqueue_raw_bytes(&chunk) {
                Ok(written) => {
                    self.pending.drain(..written);
                }
                Err(e) => {
                    log::warn!("serial: cannot queue input: {e:?}");
                    break;
                }
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(reg) = register(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        data[0] = self.uart.read(reg);
        // The guest may just have drained the FIFO: refill it from host input.
        if offset == 0 && !self.pending.is_empty() {
            self.fill_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(reg) = register(offset, data.len()) else {
            return;
        };
        if let Err(e) = self.uart.write(reg, data[0]) {
            // A closed sink must not stop the guest; the byte is lost to the
            // host only, and we say so once per failure.
            log::debug!("serial: output failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests;
