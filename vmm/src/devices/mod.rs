//! Emulated devices and the buses they sit on.

pub mod bus;
pub mod virtio;
