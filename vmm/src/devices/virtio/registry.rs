//! The running VM's virtio devices by id, so that the API (and later
//! snapshot and hot-plug) can reach any device without a device-specific
//! handle threaded through the VMM.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::{
    VIRTIO_ID_BALLOON, VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VIRTIO_ID_RNG,
};

use super::device::VirtioDevice;
use super::manager::DeviceInfo;
use super::mmio::MmioTransport;
use crate::devices::bus::lock;

/// A device's name at run time: its kind and its position among the
/// devices of that kind, in the order the guest sees them (`disk0`,
/// `disk1`, `net0`, `balloon0`, `rng0`).
pub type DeviceId = String;

/// The id prefix for a VIRTIO_ID_* type.
pub fn kind_name(device_type: u32) -> &'static str {
    match device_type {
        VIRTIO_ID_BLOCK => "disk",
        VIRTIO_ID_NET => "net",
        VIRTIO_ID_BALLOON => "balloon",
        VIRTIO_ID_RNG => "rng",
        _ => "virtio",
    }
}

/// The device kind as `/stats` and `/metrics` name it.
pub fn device_kind(device_type: u32) -> &'static str {
    match device_type {
        VIRTIO_ID_BLOCK => "block",
        other => kind_name(other),
    }
}

/// The balloon's id (a VM has at most one).
pub const BALLOON_ID: &str = "balloon0";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceLookupError {
    #[error("this VM has no device {0:?}")]
    NotFound(String),
    #[error("device {id:?} is not a {want}")]
    WrongType { id: String, want: &'static str },
}

struct Entry {
    id: DeviceId,
    info: DeviceInfo,
    transport: Arc<Mutex<MmioTransport>>,
    /// Nanoseconds the event loop held the device's notifications back.
    notify_throttled_ns: Arc<AtomicU64>,
}

/// One device's counters, as `/stats` reports them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceCounters {
    pub id: DeviceId,
    /// `block`, `net`, `balloon`, `rng`.
    pub kind: String,
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// Every virtio device of a VM, by id.
#[derive(Default)]
pub struct Devices {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| &e.id))
            .finish()
    }
}

impl Devices {
    /// Adds a device under the next id of its kind; returns that id.
    pub(crate) fn push(
        &mut self,
        info: DeviceInfo,
        transport: Arc<Mutex<MmioTransport>>,
        notify_throttled_ns: Arc<AtomicU64>,
    ) -> DeviceId {
        let kind = kind_name(info.device_type);
        let n = self
            .entries
            .iter()
            .filter(|e| e.info.device_type == info.device_type)
            .count();
        let id = format!("{kind}{n}");
        self.entries.push(Entry {
            id: id.clone(),
            info,
            transport,
            notify_throttled_ns,
        });
        id
    }

    /// Every device's counters (each read under its device's lock, which
    /// the event loop holds only while it serves that device).
    pub fn counters(&self) -> Vec<DeviceCounters> {
        self.entries
            .iter()
            .map(|e| {
                let mut counters: std::collections::BTreeMap<String, u64> = lock(&e.transport)
                    .device_mut()
                    .counters()
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                counters.insert(
                    "notify_throttled_ms".into(),
                    super::limiter::ms(&e.notify_throttled_ns),
                );
                DeviceCounters {
                    id: e.id.clone(),
                    kind: device_kind(e.info.device_type).into(),
                    counters,
                }
            })
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &DeviceInfo)> {
        self.entries.iter().map(|e| (&e.id, &e.info))
    }

    /// Runs `f` on device `id`, which must be a `T`, under the device's lock.
    pub fn with_device<T: VirtioDevice, R>(
        &self,
        id: &str,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R, DeviceLookupError> {
        let entry = self
            .entries
            .iter()
            .find(|e| e.id == id)
            .ok_or_else(|| DeviceLookupError::NotFound(id.to_owned()))?;
        let mut transport = lock(&entry.transport);
        let device: &mut dyn std::any::Any = transport.device_mut();
        let device = device
            .downcast_mut::<T>()
            .ok_or_else(|| DeviceLookupError::WrongType {
                id: id.to_owned(),
                want: short_type_name::<T>(),
            })?;
        Ok(f(device))
    }
}

/// `Balloon` for `ksmvm::devices::virtio::balloon::Balloon`.
fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}
