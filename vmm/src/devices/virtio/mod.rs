//! virtio 1.x devices on the modern (version 2) virtio-mmio transport.
//!
//! The split of concerns:
//! - [`mmio`]: the register file a vCPU thread sees (feature negotiation,
//!   queue setup, the status state machine). It owns the device model and the
//!   queues behind one mutex.
//! - [`device`]: the trait each device model implements, and [`queue`] the
//!   helpers that walk a guest's rings defensively.
//! - [`block`], [`net`], [`balloon`], [`rng`]: the device models.
//! - [`manager`]: places devices in the MMIO gap, wires their irqfd and
//!   ioeventfds into KVM and builds the guest command line; [`event_loop`]
//!   is the one thread on which all device work runs; [`registry`] finds a
//!   running device by id.
//!
//! A guest controls everything in its rings. Nothing a guest writes may
//! panic, hang or reach host memory outside guest RAM: every descriptor is
//! checked against guest memory by virtio-queue before it is touched, every
//! length and sector number is range-checked with checked arithmetic, and a
//! guest that corrupts a ring gets DEVICE_NEEDS_RESET instead of service.

// First, so that its macro is visible to the modules below.
#[macro_use]
mod ratelimit;

pub mod balloon;
pub mod block;
pub mod create;
pub mod device;
pub mod event_loop;
pub mod interrupt;
pub mod limiter;
pub mod manager;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod registry;
pub mod rng;

/// Test and fuzzing scaffolding: the unit tests' harness, public only with
/// the `fuzzing` feature (for the targets in `vmm/fuzz`).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod test_util;

// The device options live with the other settings (`config::devices`).
pub use crate::config::devices::{BalloonConfig, DiskConfig, MacAddr, NetConfig};
pub use create::{create, CreateError};
pub use device::VirtioDevice;
pub use event_loop::{EventLoopError, EventLoopHandle};
pub use manager::{DeviceInfo, EventRegistrar, ManagerError, VirtioDevices};
pub use registry::{
    device_kind, kind_name, DeviceCounters, DeviceId, DeviceLookupError, Devices, BALLOON_ID,
};

pub use balloon::{Balloon, BalloonHandle, BalloonStats};
pub use block::{Block, BlockError};
pub use net::Net;
pub use rng::Rng;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Feature bits every device offers: modern virtio, and the two ring
/// features virtio-queue implements (indirect tables and event indices).
pub const COMMON_FEATURES: u64 =
    1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC;

/// Size of the pages the balloon and the guest talk about (x86-64 guests).
pub const PAGE_SIZE: u64 = 4096;
