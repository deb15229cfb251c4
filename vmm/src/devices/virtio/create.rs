//! The device models a VM's configured [`DeviceSet`] asks for, in the
//! order the guest sees them. A new device kind gets its line here.

use vm_memory::GuestMemoryMmap;

use super::balloon::{Balloon, BalloonError};
use super::block::{Block, BlockError, ImageError};
use super::device::VirtioDevice;
use super::net::{Net, TapError};
use super::rng::Rng;
use crate::config::devices::DeviceSet;

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Disk(#[from] ImageError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    /// Not the user's input: the host could not start a device thread.
    #[error(transparent)]
    Thread(BlockError),
    #[error("cannot create the rate limiter timer of a virtio device: {0}")]
    Timer(#[source] std::io::Error),
}

impl From<BlockError> for CreateError {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::Image(i) => CreateError::Disk(i),
            other => CreateError::Thread(other),
        }
    }
}

/// Opens every device's host side (disk images, TAPs) and returns the
/// models: disks, nets, the balloon, the entropy device.
pub fn create(
    set: &DeviceSet,
    mem: &GuestMemoryMmap,
) -> Result<Vec<Box<dyn VirtioDevice>>, CreateError> {
    let mut out: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for disk in &set.disks {
        out.push(Box::new(Block::new(disk, mem)?));
    }
    for net in &set.nets {
        out.push(Box::new(Net::new(net)?));
    }
    if let Some(b) = &set.balloon {
        out.push(Box::new(Balloon::new(b, mem)?.0));
    }
    if set.rng {
        out.push(Box::new(Rng::new().map_err(CreateError::Timer)?));
    }
    Ok(out)
}
