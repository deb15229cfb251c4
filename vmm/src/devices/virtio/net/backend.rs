//! Where a virtio-net device's frames go: a TAP device in production, a
//! socket pair in tests.

use std::io;
use std::os::fd::RawFd;

/// A non-blocking, frame-preserving packet channel whose frames start with
/// a 12-byte `virtio_net_hdr_v1`.
pub trait NetBackend: Send {
    /// The fd the event loop watches (edge-triggered) for incoming frames.
    fn raw_fd(&self) -> RawFd;
    /// Reads one frame; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame whole.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Tells the backend which offloads (TUN_F_*) the guest accepts on receive.
    fn set_offload(&mut self, tun_flags: u32) -> io::Result<()>;
}
