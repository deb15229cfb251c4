//! Emulated devices and the buses they sit on.

pub mod acpi;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
